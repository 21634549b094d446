"""Exact symmetric eigendecomposition behind one pluggable backend choice.

Backends are callables `(A: (B, d, d)) -> (eigenvalues (B, d) ascending, eigenvectors (B, d, d) in columns)`, all
differentiable. `'torch'` is `torch.linalg.eigh` and works everywhere; `'cusolver'` is cuSOLVER's batched solver on
CUDA (float32/float64), tens of times faster than `torch.linalg.eigh` there. `'auto'` (the default) takes `'cusolver'`
for CUDA inputs when the library is available, else `'torch'` (on CUDA with a one-time warning).
The process-wide default comes from `set_eigh_backend`, else the environment variable `TIMM_GCP_EIGH_BACKEND`.
"""
import os
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch

from .covariance import fp32_backward
from .cusolver_eigh import cusolver_eigh, cusolver_status

__all__ = ['eigh', 'register_eigh_backend', 'list_eigh_backends', 'set_eigh_backend', 'get_eigh_backend',
           'create_eigh_backend', 'select_eigh_backend', 'use_eigh_backend', 'differentiable_eigh', 'EIGH_BACKEND_ENV']

EighFn = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
EIGH_BACKEND_ENV = 'TIMM_GCP_EIGH_BACKEND'

_BACKENDS: Dict[str, EighFn] = {}
_selected: Optional[str] = None
_warned_fallbacks: Set[str] = set()


def register_eigh_backend(name: str, fn: EighFn) -> EighFn:
    """Make `fn` selectable as eigendecomposition backend `name`."""
    _BACKENDS[name] = fn
    return fn


def list_eigh_backends() -> List[str]:
    """Names accepted by `set_eigh_backend`, 'auto' included."""
    return ['auto'] + sorted(_BACKENDS)


def _check_name(name: str, source: str = 'eigh backend') -> str:
    if name != 'auto' and name not in _BACKENDS:
        raise ValueError(f'Unknown {source} {name!r}; expected one of {list_eigh_backends()}')
    return name


def set_eigh_backend(name: Optional[str]) -> None:
    """Select the process-wide default backend ('auto' picks per device; None: back to the environment/'auto')."""
    global _selected
    _selected = None if name is None else _check_name(name)


@contextmanager
def use_eigh_backend(name: Optional[str]) -> Iterator[None]:
    """Select `name` as the default backend inside the block, then restore the previous choice."""
    global _selected
    previous = _selected
    set_eigh_backend(name)
    try:
        yield
    finally:
        _selected = previous


def get_eigh_backend() -> str:
    """The process-wide default backend name: `set_eigh_backend`'s, else $TIMM_GCP_EIGH_BACKEND, else 'auto'."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get(EIGH_BACKEND_ENV) or 'auto', f'${EIGH_BACKEND_ENV} value')


def select_eigh_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend 'auto' uses for inputs on `device` of `dtype`. Warns once per reason when CUDA falls back."""
    if device.type != 'cuda' or dtype not in (torch.float32, torch.float64):
        return 'torch'
    available, where = cusolver_status()
    if available:
        return 'cusolver'
    if where not in _warned_fallbacks:
        _warned_fallbacks.add(where)
        warnings.warn(f'cuSOLVER batched eigh unavailable ({where}); falling back to torch.linalg.eigh, which is '
                      f'much slower on CUDA', RuntimeWarning, stacklevel=2)
    return 'torch'


class _DifferentiableEigh(torch.autograd.Function):
    """Eigendecomposition by any solver, with the standard symmetric eigh backward (as torch.linalg.eigh)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, solver: EighFn) -> Tuple[torch.Tensor, torch.Tensor]:
        values, vectors = solver(a)
        ctx.save_for_backward(values, vectors)
        return values, vectors

    @staticmethod
    @fp32_backward
    def backward(ctx, grad_values: Optional[torch.Tensor], grad_vectors: Optional[torch.Tensor]):
        values, vectors = ctx.saved_tensors
        inner = torch.zeros_like(vectors)
        if grad_vectors is not None:
            projected = vectors.mT @ grad_vectors
            gaps = values.unsqueeze(-2) - values.unsqueeze(-1)  # gaps[i, j] = lambda_j - lambda_i
            gaps.diagonal(dim1=-2, dim2=-1).fill_(1.)
            inner = (projected - projected.mT).mul_(0.5).div_(gaps)
        if grad_values is not None:
            inner.diagonal(dim1=-2, dim2=-1).add_(grad_values)
        return vectors @ inner @ vectors.mT, None


def differentiable_eigh(solver: EighFn) -> EighFn:
    """Wrap a non-differentiable eigh solver so gradients flow like through `torch.linalg.eigh`."""
    return lambda a: _DifferentiableEigh.apply(a, solver)


register_eigh_backend('torch', torch.linalg.eigh)
register_eigh_backend('cusolver', differentiable_eigh(cusolver_eigh))


def _auto_eigh(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _BACKENDS[select_eigh_backend(a.device, a.dtype)](a)


def _default_eigh(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return create_eigh_backend(get_eigh_backend())(a)


def create_eigh_backend(name: Optional[str] = None) -> EighFn:
    """The eigendecomposition function for `name` (None: whatever the process-wide default is at call time)."""
    if name is None:
        return _default_eigh
    return _auto_eigh if _check_name(name) == 'auto' else _BACKENDS[name]


def eigh(a: torch.Tensor, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a batch of symmetric matrices (B, d, d)."""
    return create_eigh_backend(backend)(a)
