"""Covariance pooling primitives: the fp32 island, the covariance and the upper-triangular vectorisation."""
import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from timm.layers import register_notrace_function

from .._text import preview

__all__ = ['compute_dtype', 'fp32_island', 'fp32_backward', 'covariance', 'flat_features', 'triu_vec',
           'triu_flat_index', 'check_square_batch', 'check_covariance', 'symmetrize', 'is_tracing', 'batch_elements',
           'psd_shifted', 'autocast_enabled', 'NonFiniteCovarianceError', 'IndefiniteCovarianceError',
           'refuse_torchscript']


class NonFiniteCovarianceError(ValueError):
    """A covariance holds NaN or Inf."""


class IndefiniteCovarianceError(ValueError):
    """A covariance has an eigenvalue below -√eps·|tr Σ| (not positive semi-definite beyond rounding)."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype GCP math runs in: float64 stays float64, everything else (fp16, bf16, fp32) becomes float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def refuse_torchscript(module: torch.nn.Module) -> torch.nn.Module:
    """`__prepare_scriptable__` of the covariance modules: `torch.jit.script` of any model holding one raises this
    one RuntimeError."""
    raise RuntimeError(
        f'{type(module).__name__}: timm_gcp covariance pooling does not support TorchScript (torch.jit.script); its '
        f'meta-layers are custom autograd Functions with Python-side input checks. Use torch.compile instead.')


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for `x`'s device type (False for device types without autocast, e.g. 'meta')."""
    device_type = x.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


@contextmanager
def fp32_island(x: torch.Tensor) -> Iterator[None]:
    """Disable autocast on `x`'s device so matmuls inside really run in the dtype their inputs have (a no-op on
    device types without autocast, e.g. 'meta')."""
    if not torch.amp.is_autocast_available(x.device.type):
        yield
        return
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


def is_tracing() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace (TorchScript's ONNX exporter) is tracing: checks that
    read values back to Python are skipped then."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def batch_elements(bad: list) -> str:
    """'2 of 8 matrices, batch elements [1, 5]' for per-matrix flags `bad`."""
    indices = [i for i, flag in enumerate(bad) if flag]
    return f'{len(indices)} of {len(bad)} matrices, batch elements [{preview(indices, 8)}]'


def psd_shifted(m: torch.Tensor, floor: Optional[float] = None) -> torch.Tensor:
    """sym(M) + s·I for (B, d, d) M, s = max(√eps·|tr M|, floor) (eps of M's dtype; floor: its smallest normal number
    unless given). It has a Cholesky factor exactly when M has no eigenvalue below −√eps·|tr M|: the PSD tolerance of
    the meta-layers' input contract (`check_covariance`)."""
    sym = symmetrize(m)
    trace = sym.diagonal(dim1=-2, dim2=-1).sum(-1).abs()
    shift = (torch.finfo(m.dtype).eps ** 0.5 * trace).clamp_min(torch.finfo(m.dtype).tiny if floor is None else floor)
    return sym + torch.diag_embed(shift[:, None].expand(-1, m.shape[-1]))


def check_covariance(cov: torch.Tensor, what: str = 'input covariance') -> None:
    """Raise NonFiniteCovarianceError if the (B, d, d) `cov` holds NaN/Inf, IndefiniteCovarianceError if its
    symmetric part has an eigenvalue below -√eps·|tr Σ| (eps of `cov`'s dtype; decided by whether
    Σ + √eps·|tr Σ|·I has a Cholesky factor: `psd_shifted`). Both are ValueErrors naming `what` and the batch
    elements.

    One batched Cholesky, one reduction and one device-to-host read (a sync on CUDA); skipped on 'meta' tensors and
    while torch.compile, torch.export or torch.jit.trace (the ONNX exporters) trace.
    """
    if cov.device.type == 'meta' or is_tracing() or cov.numel() == 0:
        return
    with torch.no_grad():
        finite = torch.isfinite(cov).flatten(1).all(dim=1)
        checked = torch.where(finite[:, None, None], cov, torch.zeros_like(cov))
        info = torch.linalg.cholesky_ex(psd_shifted(checked)).info
        non_finite, indefinite = torch.stack([~finite, info != 0]).tolist()
    if any(non_finite):
        raise NonFiniteCovarianceError(f'{what} is non-finite (NaN or Inf in {batch_elements(non_finite)})')
    if any(indefinite):
        raise IndefiniteCovarianceError(
            f'{what} is not positive semi-definite: an eigenvalue is below -√eps·|trace| '
            f'({batch_elements(indefinite)}); meta-layers take covariances (e.g. `timm_gcp.covariance` output)')


def flat_features(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, C, H, W) or (B, C, M) features with at least one position -> (B, C, M) in the compute dtype; otherwise a
    ValueError naming `name`, the statistic being pooled. Call it inside `fp32_island(x)`."""
    if x.dim() not in (3, 4):
        raise ValueError(f'{name} expects features of shape (B, C, H, W) or (B, C, M), got {tuple(x.shape)}')
    if x.flatten(2).shape[-1] == 0:
        raise ValueError(f'{name} needs at least one spatial position, got {tuple(x.shape)}')
    return x.flatten(2).to(compute_dtype(x))


@register_notrace_function
def covariance(x: torch.Tensor) -> torch.Tensor:
    """Biased (1/M), mean-subtracted covariance of (B, C, H, W) or (B, C, M) features -> (B, C, C).

    Computed with autocast disabled, in float32 (float64 if `x` is float64): that is also the output dtype.
    """
    with fp32_island(x):
        x = flat_features(x, 'covariance')
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred @ centred.transpose(-1, -2) / x.shape[-1]


def cached_tensors(build: Callable) -> Callable:
    """Cache what `build` returns per (hashable) arguments, built outside inference mode: a cached inference tensor
    could not be saved for a later backward."""
    @functools.lru_cache(maxsize=None)
    @functools.wraps(build)
    def cached(*args):
        with torch.inference_mode(False):
            return build(*args)
    return cached


def triu_flat_index(d: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Positions of the upper triangle's d(d+1)/2 entries in a flattened d x d matrix, row-major (`triu_vec`'s
    order)."""
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows * d + cols


_cached_triu_flat_index = cached_tensors(triu_flat_index)


@register_notrace_function
def triu_vec(m: torch.Tensor, flat_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, d, d) -> (B, d(d+1)/2): the upper triangle in row-major order (the order of `torch.triu_indices`).
    `flat_index`: `triu_flat_index(d)` precomputed (GCPPool keeps it as a buffer, a constant for exporters, which
    cannot export `triu_indices`); without it, built on first use per (d, device) and cached."""
    check_square_batch(m, 'triu_vec input')
    if flat_index is None:
        flat_index = _cached_triu_flat_index(m.shape[-1], m.device)
    return m.flatten(1).index_select(1, flat_index)
