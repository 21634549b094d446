"""Publish an exported folder to the Hub in one commit, with retries on transient errors and a sha256 manifest."""
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar, Union

import timm
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from .. import __version__
from .export import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, check_export_dir
from .manifest import MANIFEST_NAME, build_manifest
from .model_card import REPO_ID_PLACEHOLDER
from .publishable import check_repo_id

__all__ = ['push_model', 'PushResult', 'with_retries', 'TRANSIENT_STATUS']

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


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError):
        return getattr(error.response, 'status_code', None) in TRANSIENT_STATUS
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in _TRANSIENT_ERRORS for cls in type(error).__mro__)


def with_retries(fn: Callable[[], T], what: str, max_retries: int = 5, delay: float = 1.0) -> T:
    """Call fn; on a transient error (408/429/5xx/connection) retry with exponential backoff.

    huggingface_hub retries its uploads and pre-upload calls itself (http_backoff), but not the create_repo,
    create_branch and commit POSTs, where a lost reply could duplicate a commit; here a retried commit of the same
    files is harmless (the Hub skips unchanged files), so push retries those three calls.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if attempt >= max_retries or not _is_transient(e):
                raise
            wait = min(delay * 2 ** attempt, 60.0)
            attempt += 1
            _logger.warning('%s: transient error (%s); retry %d/%d in %.1fs',
                            what, type(e).__name__, attempt, max_retries, wait)
            time.sleep(wait)


def _staged_files(folder: Path, repo_id: str) -> Dict[str, Union[bytes, Path]]:
    card = (folder / CARD_NAME).read_text().replace(REPO_ID_PLACEHOLDER, repo_id)
    return {WEIGHTS_NAME: folder / WEIGHTS_NAME, CONFIG_NAME: folder / CONFIG_NAME, CARD_NAME: card.encode()}


def push_model(
        folder: Union[str, Path],
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        max_retries: int = 5,
        retry_delay: float = 1.0,
) -> PushResult:
    """Upload model.safetensors, config.json, README.md and a sha256 manifest to `repo_id` in one commit.

    The folder is validated before any network call. The token comes from `token`, HF_TOKEN or `hf auth login`.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    config = check_export_dir(folder)
    token = token or get_token()
    if not token:
        raise ValueError('no Hugging Face token: set HF_TOKEN or run `hf auth login`')
    files = _staged_files(folder, repo_id)
    manifest = build_manifest(files, architecture=config['architecture'], timm_gcp_version=__version__)
    uploads = {**files, MANIFEST_NAME: manifest}
    branch = revision or 'main'
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)

    with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), 'create_repo', max_retries,
                 retry_delay)
    if branch != 'main':
        with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), 'create_branch',
                     max_retries, retry_delay)

    def commit():  # fresh operations per attempt: they carry upload state
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes)
                                         else str(source)) for name, source in uploads.items()]
        return api.create_commit(
            repo_id, operations=operations, revision=branch,
            commit_message=commit_message or f"Upload {config['architecture']} with timm-gcp {__version__}")

    info = with_retries(commit, 'create_commit', max_retries, retry_delay)
    sha256 = {name: entry['sha256'] for name, entry in json.loads(manifest)['files'].items()}
    return PushResult(repo_id, branch, info.oid, info.commit_url, sha256)
