"""Exact symmetric eigendecomposition behind one pluggable backend choice.

Backends are callables `(A: (B, d, d)) -> (eigenvalues (B, d) ascending, eigenvectors (B, d, d) in columns)`.
`'torch'` is `torch.linalg.eigh` and works everywhere. `'auto'` picks the fastest backend for the input's device.
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ['eigh', 'register_eigh_backend', 'list_eigh_backends', 'set_eigh_backend', 'get_eigh_backend',
           'create_eigh_backend']

EighFn = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]

_BACKENDS: Dict[str, EighFn] = {}
_selected = 'auto'


def register_eigh_backend(name: str, fn: EighFn) -> EighFn:
    """Make `fn` selectable as eigendecomposition backend `name`."""
    _BACKENDS[name] = fn
    return fn


def list_eigh_backends() -> List[str]:
    """Names accepted by `set_eigh_backend`, 'auto' included."""
    return ['auto'] + sorted(_BACKENDS)


def _check_name(name: str) -> str:
    if name != 'auto' and name not in _BACKENDS:
        raise ValueError(f'Unknown eigh backend {name!r}; expected one of {list_eigh_backends()}')
    return name


def set_eigh_backend(name: str) -> None:
    """Select the process-wide default backend ('auto' picks per device)."""
    global _selected
    _selected = _check_name(name)


def get_eigh_backend() -> str:
    """The process-wide default backend name."""
    return _selected


def _torch_eigh(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.eigh(a)


register_eigh_backend('torch', _torch_eigh)


def _auto_backend(a: torch.Tensor) -> EighFn:
    return _BACKENDS['torch']


def create_eigh_backend(name: Optional[str] = None) -> EighFn:
    """The eigendecomposition function for `name` (None: the process-wide default)."""
    name = _check_name(name or _selected)
    if name == 'auto':
        return lambda a: _auto_backend(a)(a)
    return _BACKENDS[name]


def eigh(a: torch.Tensor, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a batch of symmetric matrices (B, d, d)."""
    return create_eigh_backend(backend)(a)
