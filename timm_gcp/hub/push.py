"""Publish an exported folder to the Hub in one commit with a sha256 manifest, retrying transient errors."""
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar, Union

import timm
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from .. import __version__
from .export import EXPORT_FILES, REPO_ID_PLACEHOLDER, check_export_dir
from .manifest import MANIFEST_NAME, build_manifest, file_digest  # noqa: F401 (file_digest: part of this API)

_logger = logging.getLogger(__name__)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)  # what huggingface_hub's http_backoff retries
_TRANSIENT_ERRORS = ('TransportError', 'TimeoutException', 'NetworkError', 'RemoteProtocolError')  # httpx, by name
T = TypeVar('T')


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    sha256: Dict[str, str]


def check_repo_id(repo_id: str) -> None:
    """ValueError unless `repo_id` is ORG/NAME by the Hub's own rules (validate_repo_id)."""
    if (repo_id or '').count('/') != 1:
        raise ValueError(f'repo id must look like ORG/NAME, got {repo_id!r}')
    validate_repo_id(repo_id)


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError):
        return getattr(error.response, 'status_code', None) in TRANSIENT_STATUS
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in _TRANSIENT_ERRORS for cls in type(error).__mro__)


def with_retries(fn: Callable[[], T], what: str, max_retries: int = 5, delay: float = 1.0) -> T:
    """fn(), retried with exponential backoff on a transient error (408/429/5xx, connection, timeout): for the
    create_repo, create_branch and commit POSTs, which huggingface_hub does not retry (docs/hub.md). `what` names
    the call and its endpoint; a connection that never succeeds ends in a ConnectionError naming them, the attempts
    and the time spent."""
    waits = [min(delay * 2 ** attempt, 60.0) for attempt in range(max_retries)]
    start = time.monotonic()
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except Exception as e:
            if not _is_transient(e):
                raise
            if attempt >= max_retries:
                if isinstance(e, HfHubHTTPError):  # the server answered: its error names the URL and status
                    raise
                raise ConnectionError(
                    f'{what}: no connection after {attempt + 1} attempt(s) over {time.monotonic() - start:.1f} s '
                    f'({type(e).__name__}: {e}); check the network and HF_ENDPOINT (--max-retries, --retry-delay '
                    f'set the retries)') from e
            budget = f' (at most {sum(waits):g} s of retries in all)' if attempt == 0 else ''
            _logger.warning('%s: transient error (%s); retry %d/%d in %.1fs%s', what, type(e).__name__, attempt + 1,
                            max_retries, waits[attempt], budget)
            time.sleep(waits[attempt])


def push_model(folder: Union[str, Path], repo_id: str, *, private: bool = False, revision: Optional[str] = None,
               commit_message: Optional[str] = None, token: Optional[str] = None, max_retries: int = 5,
               retry_delay: float = 1.0) -> PushResult:
    """Upload model.safetensors, config.json, README.md and a sha256 manifest to `repo_id` in one commit.

    The folder is validated before any network call. The token comes from `token`, HF_TOKEN or `hf auth login`.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    config = check_export_dir(folder)
    token = token or get_token()
    if not token:
        raise ValueError('no Hugging Face token: set HF_TOKEN or run `hf auth login`')
    files = {name: folder / name for name in EXPORT_FILES}
    files['README.md'] = files['README.md'].read_text().replace(REPO_ID_PLACEHOLDER, repo_id).encode()
    manifest = build_manifest(files, architecture=config['architecture'], timm_gcp_version=__version__)
    files[MANIFEST_NAME] = manifest
    branch = revision or 'main'
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    at = f' at {api.endpoint}'
    with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), 'create_repo' + at, max_retries,
                 retry_delay)
    if branch != 'main':
        with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), 'create_branch' + at,
                     max_retries, retry_delay)
    message = commit_message or f"Upload {config['architecture']} with timm-gcp {__version__}"

    def commit():  # fresh operations per attempt: they carry upload state
        operations = [CommitOperationAdd(name, source) for name, source in files.items()]
        return api.create_commit(repo_id, operations=operations, revision=branch, commit_message=message)

    info = with_retries(commit, 'create_commit' + at, max_retries, retry_delay)
    sha256 = {name: entry['sha256'] for name, entry in json.loads(manifest)['files'].items()}
    return PushResult(repo_id, branch, info.oid, info.commit_url, sha256)
