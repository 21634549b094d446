"""What export_model and push_model refuse to publish: non-finite weights or metrics, and this machine's local paths
or user name in a published text."""
import getpass
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Tuple

import torch
from huggingface_hub.utils import validate_repo_id

__all__ = ['check_finite_tensors', 'check_finite_metrics', 'check_no_local_paths', 'check_repo_id']


def check_finite_tensors(tensors: Iterable[Tuple[str, torch.Tensor]], what: str) -> None:
    """ValueError naming how many (and a few) floating-point tensors of `what` hold NaN or Inf."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f'{what} has {len(bad)} non-finite tensors (NaN/Inf), e.g. {bad[:5]}: the run diverged; '
                         f'refusing to publish it')


def check_finite_metrics(metrics: Mapping[str, Any], what: str) -> None:
    """ValueError when a value of `metrics` is not a finite number."""
    bad = {k: v for k, v in metrics.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ValueError(f'{what} must be finite numbers, got {bad}: refusing to publish them')


_SYSTEM_ACCOUNTS = ('root',)  # names no person owns, and words of a card ("matrix square root")


def _user_name() -> Optional[str]:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor in the password database
        return None
    return None if user in _SYSTEM_ACCOUNTS else user


def _local_path_pattern() -> re.Pattern:
    """Matches an absolute path under a top-level folder of this machine, a Windows drive path or the user name."""
    roots = sorted((p.name for p in Path('/').iterdir() if p.is_dir()), key=len, reverse=True)
    alternatives = [r'\b[A-Za-z]:\\[^\s"\'`]*']
    if roots:
        alternatives.append(r'(?<![\w.:/~-])/(?:%s)(?![\w.-])[^\s"\'`),\]]*' % '|'.join(map(re.escape, roots)))
    user = _user_name()
    if user:
        alternatives.append(r'(?<![\w-])%s(?![\w-])' % re.escape(user))
    return re.compile('|'.join(alternatives))


def check_no_local_paths(name: str, text: str) -> None:
    """ValueError naming the file `name` and the text when `text` holds a local path or the user name."""
    found = _local_path_pattern().search(text)
    if found:
        raise ValueError(f'{name} would publish {found[0]!r}: published files must not hold absolute paths, the home '
                         f'directory or the user name of this machine (name data sets by their folder name or Hub id)')


def check_repo_id(repo_id: str) -> None:
    """ValueError unless `repo_id` is ORG/NAME by the Hub's own rules (huggingface_hub's validate_repo_id)."""
    if (repo_id or '').count('/') != 1:
        raise ValueError(f'repo id must look like ORG/NAME, got {repo_id!r}')
    validate_repo_id(repo_id)
