"""iSQRT-COV: matrix square root by coupled Newton-Schulz iteration (Li et al., CVPR 2018)."""
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..ops import fp32_backward
from .registry import MetaLayer, register_meta_layer

__all__ = ['ISqrt', 'newton_schulz_sqrt', 'newton_schulz_sqrt_fast']


def _check_num_iter(num_iter: int) -> None:
    if num_iter < 1:
        raise ValueError(f'num_iter must be >= 1, got {num_iter}')


def _trace_floor(dtype: torch.dtype) -> float:
    """Smallest trace used for pre-normalisation, so all-zero covariances stay finite."""
    return torch.finfo(dtype).tiny ** 0.5


def newton_schulz_sqrt(cov: torch.Tensor, num_iter: int = 5) -> torch.Tensor:
    """Approximate square root of (B, d, d) SPD matrices: trace pre-normalisation, `num_iter` coupled
    Newton-Schulz steps (the last one updates Y only), √trace post-compensation.

    The reference formulation, differentiated by plain autograd; `newton_schulz_sqrt_fast` computes the same.
    """
    _check_num_iter(num_iter)
    d = cov.shape[-1]
    eye3 = 3.0 * torch.eye(d, dtype=cov.dtype, device=cov.device)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(_trace_floor(cov.dtype))[:, None, None]
    y = cov / trace
    z = None
    for _ in range(num_iter - 1):
        t = 0.5 * (eye3 - (y if z is None else z @ y))
        y, z = y @ t, (t if z is None else t @ z)
    t = 0.5 * (eye3 - (y if z is None else z @ y))
    return (y @ t) * trace.sqrt()


_IDENTITY_CACHE: Dict[Tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _identity_times_1_5(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (d, dtype, device)
    if key not in _IDENTITY_CACHE:
        _IDENTITY_CACHE[key] = torch.eye(d, dtype=dtype, device=device).mul_(1.5)
    return _IDENTITY_CACHE[key]


class _NewtonSchulzSqrt(torch.autograd.Function):
    """Newton-Schulz square root with a hand-derived backward.

    Every iterate is a polynomial in A = cov / trace, so all of them are symmetric and commute; the adjoint of one step
    T = ½(3I - Z Y), Y' = Y T, Z' = T Z is then
        gT = Y gY' + gZ' Z,   gY = gY' T - ½ Z gT,   gZ = T gZ' - ½ gT Y,
    six matrix products per step with the elementwise work fused into them (baddbmm's alpha/beta).
    """

    @staticmethod
    def forward(ctx, cov: torch.Tensor, num_iter: int) -> torch.Tensor:
        eye_15 = _identity_times_1_5(cov.shape[-1], cov.dtype, cov.device)
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        scale = trace.clamp_min(_trace_floor(cov.dtype))[:, None, None]
        root_scale = scale.sqrt()
        a = cov / scale
        ys: List[torch.Tensor] = [a]
        zs: List[Optional[torch.Tensor]] = [None]  # None stands for Z0 = I
        ts: List[torch.Tensor] = []
        for step in range(num_iter):
            y, z = ys[-1], zs[-1]
            t = torch.add(eye_15, y, alpha=-0.5) if z is None else torch.baddbmm(eye_15, z, y, alpha=-0.5)
            ts.append(t)
            if step < num_iter - 1:
                ys.append(torch.bmm(y, t))
                zs.append(t if z is None else torch.bmm(t, z))
        out = torch.bmm(ys[-1], ts[-1]).mul_(root_scale)
        if ctx.needs_input_grad[0]:
            ctx.iterates = ys, zs, ts
            ctx.clamped = trace < _trace_floor(cov.dtype)
            ctx.save_for_backward(scale, root_scale, out)
        return out

    @staticmethod
    @once_differentiable
    @fp32_backward
    def backward(ctx, grad_out: torch.Tensor):
        scale, root_scale, out = ctx.saved_tensors
        ys, zs, ts = ctx.iterates
        # out = Y_N(A) * sqrt(s): gradient of s through the post-compensation
        grad_scale = torch.linalg.vecdot(grad_out.flatten(1), out.flatten(1)) / (2 * scale.flatten())
        grad_y, grad_z = grad_out * root_scale, None
        for y, z, t in zip(reversed(ys), reversed(zs), reversed(ts)):
            grad_t = torch.bmm(y, grad_y)
            if grad_z is not None:
                grad_t = grad_t.add_(grad_z) if z is None else grad_t.baddbmm_(grad_z, z)
            if z is None:  # first step, Z0 = I: nothing upstream of Z
                grad_y = torch.baddbmm(grad_t, grad_y, t, beta=-0.5)
                continue
            grad_y_prev = torch.bmm(grad_y, t).baddbmm_(z, grad_t, alpha=-0.5)
            if grad_z is None:
                grad_z = torch.bmm(grad_t, y).mul_(-0.5)
            else:
                grad_z = torch.bmm(t, grad_z).baddbmm_(grad_t, y, alpha=-0.5)
            grad_y = grad_y_prev
        # A = cov / s, s = max(trace, floor)
        grad_scale -= torch.linalg.vecdot(grad_y.flatten(1), ys[0].flatten(1)) / scale.flatten()
        grad_cov = grad_y.div_(scale)
        grad_cov.diagonal(dim1=-2, dim2=-1).add_(grad_scale.masked_fill_(ctx.clamped, 0.)[:, None])
        return grad_cov, None


def newton_schulz_sqrt_fast(cov: torch.Tensor, num_iter: int = 5) -> torch.Tensor:
    """`newton_schulz_sqrt` with a fused forward and a hand-derived backward (same numbers within rounding).

    Once differentiable: use `newton_schulz_sqrt` for higher-order gradients.
    """
    _check_num_iter(num_iter)
    return _NewtonSchulzSqrt.apply(cov, num_iter)


@functools.lru_cache(maxsize=None)
def compiled_newton_schulz_sqrt() -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`newton_schulz_sqrt` through torch.compile with CUDA graphs ('reduce-overhead'): one graph replay instead of
    dozens of kernel launches per pass. Compiled on first call, per shape."""
    return torch.compile(newton_schulz_sqrt, mode='reduce-overhead', dynamic=False)


@register_meta_layer('isqrt')
class ISqrt(MetaLayer):
    """iSQRT-COV Newton-Schulz square root; `num_iter=5` in ResNets, 3 in the GSoP-Net2 head.

    `compile=True` runs it through `compiled_newton_schulz_sqrt` (fastest on CUDA once compiled); the default is the
    eager fused forward and hand-derived backward of `newton_schulz_sqrt_fast`. Inside a model compiled with
    torch.compile the reference recurrence is traced instead (the compiler fuses it; the hand-written backward
    cannot be traced).
    """

    def __init__(self, num_iter: int = 5, compile: bool = False):
        super().__init__()
        _check_num_iter(num_iter)
        self.num_iter = num_iter
        self.compile = compile

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inside a compiled model: let the compiler trace the plain recurrence
            return newton_schulz_sqrt(cov, self.num_iter)
        if self.compile:
            return compiled_newton_schulz_sqrt()(cov, self.num_iter)
        return newton_schulz_sqrt_fast(cov, self.num_iter)

    def extra_repr(self) -> str:
        return f'num_iter={self.num_iter}, compile={self.compile}'
