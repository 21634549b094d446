"""Covariance pooling primitives: the fp32 island, the covariance and the upper-triangular vectorisation."""
import functools
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ['compute_dtype', 'fp32_island', 'fp32_backward', 'covariance', 'triu_vec', 'check_square_batch',
           'symmetrize']


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype GCP math runs in: float64 stays float64, everything else (fp16, bf16, fp32) becomes float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@contextmanager
def fp32_island(x: torch.Tensor) -> Iterator[None]:
    """Disable autocast on `x`'s device so matmuls inside really run in the dtype their inputs have."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def fp32_backward(backward: Callable) -> Callable:
    """Decorate an autograd.Function's backward to run with autocast disabled, like its forward: a backward called
    inside an autocast region would otherwise run its matmuls in low precision (or mix dtypes and fail)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with fp32_island(next(g for g in grads if g is not None)):
            return backward(ctx, *grads)
    return run


def check_square_batch(m: torch.Tensor, what: str = 'input') -> None:
    """Raise ValueError unless `m` is a batch of square matrices (B, d, d)."""
    if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f'{what} must be a batch of square matrices of shape (B, d, d), got {tuple(m.shape)}')


def symmetrize(m: torch.Tensor) -> torch.Tensor:
    """(M + Mᵀ)/2 over the last two dimensions."""
    return 0.5 * (m + m.transpose(-1, -2))


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Biased (1/M), mean-subtracted covariance of (B, C, H, W) or (B, C, M) features -> (B, C, C).

    Computed with autocast disabled, in float32 (float64 if `x` is float64): that is also the output dtype.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f'covariance expects features of shape (B, C, H, W) or (B, C, M), got {tuple(x.shape)}')
    with fp32_island(x):
        x = x.flatten(2).to(compute_dtype(x))
        num_positions = x.shape[-1]
        if num_positions == 0:
            raise ValueError(f'covariance needs at least one spatial position, got {tuple(x.shape)}')
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred @ centred.transpose(-1, -2) / num_positions


def cached_tensors(build: Callable) -> Callable:
    """Cache what `build` returns per (hashable) arguments, built outside inference mode: a cached inference tensor
    could not be saved for a later backward."""
    @functools.lru_cache(maxsize=None)
    @functools.wraps(build)
    def cached(*args):
        with torch.inference_mode(False):
            return build(*args)
    return cached


@cached_tensors
def _triu_flat_index(d: int, device: torch.device) -> torch.Tensor:
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows * d + cols


def triu_vec(m: torch.Tensor) -> torch.Tensor:
    """(B, d, d) -> (B, d(d+1)/2): the upper triangle in row-major order (the order of `torch.triu_indices`)."""
    check_square_batch(m, 'triu_vec input')
    d = m.shape[-1]
    return m.reshape(m.shape[0], d * d).index_select(1, _triu_flat_index(d, m.device))
