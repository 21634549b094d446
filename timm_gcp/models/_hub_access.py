"""Hub access for pretrained weights: one clear error, at once, when the weights are neither cached nor reachable."""
from contextlib import contextmanager
from typing import Iterator

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from timm.models import PretrainedCfg

__all__ = ['WeightsUnavailable', 'hub_weights']

_PROBE_TIMEOUT_S = 10


class WeightsUnavailable(RuntimeError):
    """Pretrained weights of `name` (from Hub repo `repo_id`) that neither the Hugging Face cache nor the Hub can
    deliver, `reason` saying why; the message says what to do from Python."""

    def __init__(self, name: str, repo_id: str, reason: str):
        self.name, self.repo_id, self.reason = name, repo_id, reason
        super().__init__(
            f'{name}: cannot load the weights of Hub repo {repo_id} ({reason}). Load it once with network access '
            f'to fill the cache (HF_HUB_OFFLINE=1 works after that), pass a local copy with '
            f'pretrained_cfg_overlay=dict(file="/path/to/model.safetensors"), or use pretrained=False.')


def fetch_error(name: str, cfg: PretrainedCfg, cause: BaseException) -> WeightsUnavailable:
    """The error for weights of `name` that neither the cache nor the Hub can deliver."""
    if constants.HF_HUB_OFFLINE:
        reason = 'HF_HUB_OFFLINE is set and they are not in the Hugging Face cache'
    else:
        reason = f'{constants.ENDPOINT} cannot deliver them: {type(cause).__name__}: {str(cause).splitlines()[0]}'
    return WeightsUnavailable(name, cfg.hf_hub_id, reason)


def check_hub_reachable(name: str, cfg: PretrainedCfg) -> None:
    """Fail within seconds when the weights are neither cached nor reachable (huggingface_hub would retry for about
    a minute first)."""
    filename = cfg.hf_hub_filename or 'model.safetensors'
    repo_id, _, revision = cfg.hf_hub_id.partition('@')
    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo_id, filename, revision=revision or None),
                                              str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision or None), timeout=_PROBE_TIMEOUT_S)
    except (EntryNotFoundError, RevisionNotFoundError):
        return  # reachable; timm looks for its other file names and reports a missing revision itself
    except Exception as err:  # refused, timed out, unknown repo: any of them means no weights
        raise fetch_error(name, cfg, err) from err


@contextmanager
def hub_weights(name: str, cfg: PretrainedCfg, from_hub: bool) -> Iterator[None]:
    """Around loading the weights of `name`: when they come from the Hub (`from_hub`), `check_hub_reachable` first and
    a failed download raised as `fetch_error`; otherwise nothing."""
    if not from_hub:
        yield
        return
    check_hub_reachable(name, cfg)
    try:
        yield
    except (OSError, EntryNotFoundError) as err:
        raise fetch_error(name, cfg, err) from None
