"""iSQRT-COV: matrix square root by coupled Newton-Schulz iteration (Li et al., CVPR 2018)."""
import functools
from typing import Callable, List, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..ops import fp32_backward
from ..ops.covariance import symmetrize
from .options import MAX_MATRIX_ITER, bool_option, int_option
from .registry import MetaLayer, register_meta_layer

__all__ = ['ISqrt', 'newton_schulz_sqrt', 'compiled_newton_schulz_sqrt']


def _check_num_iter(num_iter: int, layer: str = 'newton_schulz_sqrt') -> int:
    return int_option(layer, 'num_iter', num_iter, 1, MAX_MATRIX_ITER)


def _trace_floor(dtype: torch.dtype) -> float:
    """Smallest trace used for pre-normalisation, so all-zero covariances stay finite."""
    return torch.finfo(dtype).tiny ** 0.5


class _NewtonSchulzSqrt(torch.autograd.Function):
    """Coupled Newton-Schulz square root, fused forward and hand-derived backward (one forward-mode sweep: the
    derivative of a matrix polynomial at a symmetric matrix is self-adjoint; see docs/meta_layers.md)."""

    @staticmethod
    def forward(ctx, cov: torch.Tensor, num_iter: int) -> torch.Tensor:
        eye_15 = 1.5 * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        scale = trace.clamp_min(_trace_floor(cov.dtype))
        y = p = symmetrize(cov) / scale[:, None, None]
        ys: List[torch.Tensor] = []
        ts: List[torch.Tensor] = []
        ws: List[torch.Tensor] = []
        for step in range(num_iter):
            t = torch.add(eye_15, p, alpha=-0.5)
            ys.append(y)
            ts.append(t)
            y = torch.bmm(y, t)
            if step < num_iter - 1:
                if step == 0:
                    w = y  # Y_0 = P_0, so W_0 = P_0 T_0 = Y_1 (saved once, as Y_1)
                else:
                    w = torch.bmm(p, t)
                    ws.append(w)
                p = torch.bmm(w, t)
        out = y * scale.sqrt()[:, None, None]
        if ctx.needs_input_grad[0]:
            ctx.num_iter = num_iter
            ctx.save_for_backward(scale, out, trace < _trace_floor(cov.dtype), *ys, *ts, *ws)
        return out

    @staticmethod
    @once_differentiable
    @fp32_backward
    def backward(ctx, grad_out: torch.Tensor):
        scale, out, clamped, *iterates = ctx.saved_tensors
        n = ctx.num_iter
        ys, ts = iterates[:n], iterates[n:2 * n]
        ws = iterates[1:min(n, 2)] + iterates[2 * n:]  # W_0 = Y_1, saved once
        grad_out = symmetrize(grad_out)
        # out = Y_N(A) * sqrt(s): gradient of s through the post-compensation
        grad_scale = torch.linalg.vecdot(grad_out.flatten(1), out.flatten(1)) / (2 * scale)
        grad_a = _newton_schulz_derivative(ys, ts, ws, grad_out.mul_(scale.sqrt()[:, None, None]))
        # A = cov / s, s = max(trace, floor)
        grad_scale = grad_scale - torch.linalg.vecdot(grad_a.flatten(1), ys[0].flatten(1)) / scale
        grad_cov = grad_a.div_(scale[:, None, None])
        grad_cov.diagonal(dim1=-2, dim2=-1).add_(grad_scale.masked_fill(clamped, 0.)[:, None])
        return grad_cov, None


def _newton_schulz_derivative(ys: Sequence[torch.Tensor], ts: Sequence[torch.Tensor], ws: Sequence[torch.Tensor],
                              tangent: torch.Tensor) -> torch.Tensor:
    """Derivative of Y_N in the symmetric direction `tangent` of A, from the forward's Y_k, T_k and W_k = P_k T_k."""
    dp = tangent
    dy = None  # dY_0 = dP_0 = tangent
    for step, (y, t) in enumerate(zip(ys, ts)):
        updates_p = step < len(ws)
        dp_t = torch.bmm(dp, t) if dy is None or updates_p else None
        if dy is None:  # A = P_0 = 3I - 2T_0: dY_1 = E T_0 - ½ A E = E T_0 + T_0 E - 1.5 E
            dy_next = torch.add(dp_t, dp_t.mT).add_(dp, alpha=-1.5)
        else:
            dy_next = torch.bmm(dy, t).baddbmm_(y, dp, alpha=-0.5)
        if updates_p:
            dp_w = torch.bmm(dp, ws[step])
            dp = torch.baddbmm(dp_w, dp_t.mT, t, beta=-0.5).add_(dp_w.mT, alpha=-0.5)
        dy = dy_next
    return dy


def newton_schulz_sqrt(cov: torch.Tensor, num_iter: int = 5) -> torch.Tensor:
    """Approximate square root of (B, d, d) SPD matrices: symmetrisation, trace pre-normalisation, `num_iter` coupled
    Newton-Schulz steps (the last one updates Y only), √trace post-compensation. Once differentiable."""
    _check_num_iter(num_iter)
    return _NewtonSchulzSqrt.apply(cov, num_iter)


@functools.lru_cache(maxsize=None)
def compiled_newton_schulz_sqrt() -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`newton_schulz_sqrt` through torch.compile with CUDA graphs ('reduce-overhead'): one graph replay
    instead of dozens of kernel launches per pass. Compiled on first call, per shape."""
    return torch.compile(newton_schulz_sqrt, mode='reduce-overhead', dynamic=False)


ISQRT_COV_BIBTEX = """@inproceedings{li2018towards,
  title={Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root Normalization},
  author={Li, Peihua and Xie, Jiangtao and Wang, Qilong and Gao, Zilin},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2018}
}"""
FAST_MPN_COV_BIBTEX = """@inproceedings{wang2020deep,
  title={What Deep CNNs Benefit from Global Covariance Pooling: An Optimization Perspective},
  author={Wang, Qilong and Zhang, Li and Wu, Banggu and Ren, Dongwei and Li, Peihua and Zuo, Wangmeng and Hu, Qinghua},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2020}
}"""

@register_meta_layer('isqrt')
class ISqrt(MetaLayer):
    """iSQRT-COV Newton-Schulz square root; `num_iter` (1 to 100) is 5 in ResNets, 3 in the GSoP-Net2 head.

    Runs `newton_schulz_sqrt` (fused forward, hand-derived backward), also inside a model compiled with
    torch.compile, which traces both; `compile=True` runs it through `compiled_newton_schulz_sqrt` on its own.
    """
    papers = (ISQRT_COV_BIBTEX, FAST_MPN_COV_BIBTEX)
    power = 0.5

    def __init__(self, num_iter: int = 5, compile: bool = False):
        super().__init__()
        self.num_iter = _check_num_iter(num_iter, self.name)
        self.compile = bool_option(self.name, 'compile', compile)

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        if self.compile and not torch.compiler.is_compiling():
            return compiled_newton_schulz_sqrt()(cov, self.num_iter)
        return newton_schulz_sqrt(cov, self.num_iter)

    def extra_repr(self) -> str:
        return f'num_iter={self.num_iter}, compile={self.compile}'
