"""Publish an exported folder to the Hub in one commit, with retries on transient errors and a sha256 manifest."""
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar, Union

import timm
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError
from safetensors import safe_open

from .. import __version__
from .export import CARD_NAME, CONFIG_NAME, EXPORT_FILES, WEIGHTS_NAME
from .manifest import MANIFEST_NAME, build_manifest
from .model_card import REPO_ID_PLACEHOLDER, card_metrics
from .publishable import check_finite_metrics, check_finite_tensors, check_no_local_paths

__all__ = ['check_export_dir', 'check_repo_id', 'push_model', 'PushResult', 'redact_token', 'with_retries',
           'TRANSIENT_STATUS']

_logger = logging.getLogger(__name__)
TRANSIENT_STATUS = (429, 500, 502, 503, 504)
_TRANSIENT_ERRORS = ('TransportError', 'TimeoutException', 'NetworkError', 'RemoteProtocolError')
T = TypeVar('T')


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    sha256: Dict[str, str]


def check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id or ''):
        raise ValueError(f'repo id must look like ORG/NAME, got {repo_id!r}')


def _reject_constant(name: str) -> float:
    raise ValueError(f'{CONFIG_NAME} holds the non-finite number {name}: refusing to publish it')


def check_export_dir(folder: Union[str, Path]) -> dict:
    """Validate an export folder without any network call (files, config, finite weights and metrics, no local
    paths in the texts); returns its config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f'{folder} is not a directory: expected an exported model folder (e.g. RUN_DIR/model)')
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f'{folder} lacks {missing}; an export holds {list(EXPORT_FILES)} (see export_model)')
    try:
        config_text = (folder / CONFIG_NAME).read_text()
        config = json.loads(config_text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{folder / CONFIG_NAME} is not valid JSON: {e}') from e
    absent = [k for k in ('architecture', 'num_classes', 'pretrained_cfg') if k not in config]
    if absent:
        raise ValueError(f'{folder / CONFIG_NAME} lacks {absent}: not a timm config.json')
    if not timm.is_model(config['architecture']):
        raise ValueError(f"architecture {config['architecture']!r} is not registered with timm, so "
                         f"'hf-hub:' loading of this folder would fail (did the export come from timm_gcp?)")
    labels = config.get('label_names')
    if labels is not None and len(labels) != config['num_classes']:
        raise ValueError(f"config.json has {len(labels)} label_names for {config['num_classes']} classes")
    try:
        with safe_open(str(folder / WEIGHTS_NAME), 'pt') as f:
            classifier = f"{config['pretrained_cfg'].get('classifier', 'fc')}.weight"
            if classifier in f.keys() and f.get_slice(classifier).get_shape()[0] != config['num_classes']:
                raise ValueError(f"{classifier} has {f.get_slice(classifier).get_shape()[0]} rows but config.json "
                                 f"says num_classes={config['num_classes']}")
            check_finite_tensors(((k, f.get_tensor(k)) for k in f.keys()), str(folder / WEIGHTS_NAME))
    except (OSError, RuntimeError) as e:  # safetensors raises these for unreadable / truncated headers
        raise ValueError(f'{folder / WEIGHTS_NAME} is not a readable safetensors file: {e}') from e
    card_text = (folder / CARD_NAME).read_text()
    card = ModelCard(card_text)
    if card.data.library_name != 'timm':
        raise ValueError(f'{folder / CARD_NAME} metadata must say library_name: timm (found {card.data.library_name!r})')
    check_finite_metrics(card_metrics(card), f'the model-index metrics of {folder / CARD_NAME}')
    for name, text in ((CONFIG_NAME, config_text), (CARD_NAME, card_text)):
        check_no_local_paths(name, text)
    return config


def redact_token(text: str) -> str:
    """`text` with the active Hugging Face token masked (for error messages that echo requests)."""
    token = get_token()
    return text.replace(token, '***') if token else text


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError):
        return getattr(error.response, 'status_code', None) in TRANSIENT_STATUS
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in _TRANSIENT_ERRORS for cls in type(error).__mro__)


def with_retries(fn: Callable[[], T], what: str, max_retries: int = 5, delay: float = 1.0) -> T:
    """Call fn; on a transient HTTP error (429/5xx/connection) retry with exponential backoff."""
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
