"""Exact symmetric eigendecomposition: `torch.linalg.eigh` or cuSOLVER's batched solver, chosen per call.

`'torch'` works everywhere; `'cusolver'` (CUDA, float32/float64) is tens of times faster than `torch.linalg.eigh`
there; `'auto'` takes `'cusolver'` for CUDA inputs when the library loads, else `'torch'` (on CUDA with a one-time
warning). Both backends are differentiable.
"""
import warnings
from typing import Optional, Set, Tuple

import torch

from .covariance import fp32_backward
from .cusolver_eigh import cusolver_eigh, cusolver_status

__all__ = ['EIGH_BACKENDS', 'eigh', 'check_eigh_backend', 'auto_eigh_backend']

EIGH_BACKENDS = ('auto', 'torch', 'cusolver')

_warned_fallbacks: Set[str] = set()


def check_eigh_backend(name: str, what: str = 'eigh backend') -> str:
    """`name` if it is one of `EIGH_BACKENDS`, else one ValueError naming them."""
    if not isinstance(name, str) or name not in EIGH_BACKENDS:
        raise ValueError(f'{what} must be one of {", ".join(map(repr, EIGH_BACKENDS))}, got {name!r}')
    return name


def auto_eigh_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
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
    """Eigendecomposition by a non-differentiable solver, with `torch.linalg.eigh`'s backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, solver) -> Tuple[torch.Tensor, torch.Tensor]:
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


def eigh(a: torch.Tensor, backend: str = 'auto') -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (B, d) ascending and eigenvectors (B, d, d) in columns of a batch of symmetric matrices, by
    `backend` ('auto', 'torch' or 'cusolver'); differentiable."""
    if check_eigh_backend(backend) == 'auto':
        backend = auto_eigh_backend(a.device, a.dtype)
    if backend == 'torch':
        return torch.linalg.eigh(a)
    return _DifferentiableEigh.apply(a, cusolver_eigh)
