"""iSICE (Rahman et al., "Learning Partial Correlation based Deep Visual Representation for Image Classification",
CVPR 2023): a sparse inverse covariance by unrolled proximal-gradient steps on the graphical lasso.

For C = sym(Σ)/tr Σ the layer approaches argmin_P tr(CP) − log det P + λ Σ_ij |P_ij| (every entry penalised, the
diagonal included, as in the paper) from P_0 = (C + λI)⁻¹, splitting P into its positive and negative parts; the
output is P/tr Σ. Autograd differentiates the steps (P⁻¹ by one Cholesky factorisation per step, with the inverse's
backward −P⁻¹ G P⁻¹). Choices and derivation: docs/meta_layers.md.
"""
from typing import List, Optional

import torch
from torch.autograd.function import once_differentiable

from ..ops.covariance import fp32_island, symmetrize
from .options import MAX_MATRIX_ITER, float_option, int_option
from .registry import MetaLayer, register_meta_layer

__all__ = ['ISice', 'sparse_inverse_covariance', 'step_factors']

MIN_LAM = 1e-3  # above float32's PSD tolerance √eps = 3.5e-4 of a trace-1 covariance: C + λI stays positive definite
MAX_LR = 100.0


def step_factors(steps: int) -> List[float]:
    """The decay 1 − i/(steps − 1) of step i, without the last step's 0 (it changes nothing); [1.0] for one step."""
    return [1.0] if steps == 1 else [1 - i / (steps - 1) for i in range(steps - 1)]


def _trace_floor(dtype: torch.dtype) -> float:
    """Smallest trace normalised by: P/tr Σ and its gradient (∝ 1/tr²) stay finite for an all-zero covariance."""
    return torch.finfo(dtype).tiny ** 0.25


class _InverseWherePositiveDefinite(torch.autograd.Function):
    """(A, fallback) -> (A⁻¹ where A is positive definite, `fallback` elsewhere; the (B,) bool mask of where).

    One Cholesky factorisation decides and inverts; the backward is the inverse's, −A⁻¹ G A⁻¹ (two products)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, fallback: torch.Tensor):
        factor, info = torch.linalg.cholesky_ex(a)
        accepted = info == 0
        mask = accepted[:, None, None]
        inverse = torch.where(mask, torch.cholesky_inverse(factor), fallback)  # (exactly symmetric where accepted)
        ctx.mark_non_differentiable(accepted)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(mask, inverse)
        return inverse, accepted

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_inverse: Optional[torch.Tensor], _):
        if grad_inverse is None:
            return None, None
        mask, inverse = ctx.saved_tensors
        with fp32_island(grad_inverse):
            through_inverse = -(inverse @ grad_inverse @ inverse)
        zero = torch.zeros_like(grad_inverse)
        return torch.where(mask, through_inverse, zero), torch.where(mask, zero, grad_inverse)


def sparse_inverse_covariance(cov: torch.Tensor, lam: float = 0.01, steps: int = 5, lr: float = 1.0) -> torch.Tensor:
    """iSICE's sparse inverse of (B, d, d) PSD covariances Σ: P/tr Σ after the proximal-gradient steps on the graphical
    lasso of C = sym(Σ)/tr Σ with penalty `lam` on every entry, from P = (C + λI)⁻¹: `steps` steps of size
    `lr`·(1 − i/(steps − 1)), each on the positive and negative parts of P: P± ← relu(P± − η(±G + λ)), G = C − P⁻¹,
    P = P⁺ − P⁻; a step that would leave the positive-definite cone is skipped. Options are range-checked by `ISice`."""
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(_trace_floor(cov.dtype))[:, None, None]
    normalised = symmetrize(cov) / trace
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    inverse = normalised + lam * eye  # positive definite: C ⪰ −√eps·I by the input contract and λ > √eps, so the
    precision, _ = _InverseWherePositiveDefinite.apply(inverse, eye / lam)  # fallback (I/λ, P* for C = 0) is unused
    for factor in step_factors(steps):
        step = lr * factor
        grad = normalised - inverse
        positive = torch.relu(precision)
        plus = torch.sub(positive, grad, alpha=step).sub_(step * lam).relu_()
        minus = torch.add(positive - precision, grad, alpha=step).sub_(step * lam).relu_()
        candidate = plus - minus  # symmetric as P and G are: the paper's sym(P⁺ − P⁻) changes nothing
        inverse, accepted = _InverseWherePositiveDefinite.apply(candidate, inverse)
        precision = torch.where(accepted[:, None, None], candidate, precision)
    return precision / trace


ISICE_BIBTEX = """@inproceedings{rahman2023learning,
  title={Learning Partial Correlation based Deep Visual Representation for Image Classification},
  author={Rahman, Saimunur and Koniusz, Piotr and Wang, Lei and Zhou, Luping and Moghadam, Peyman and Sun, Changming},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}"""

@register_meta_layer('isice')
class ISice(MetaLayer):
    """iSICE sparse inverse covariance (Rahman et al., CVPR 2023): `sparse_inverse_covariance`.

    Args:
        lam: the ℓ1 penalty λ on every entry of P, in [0.001, 1] (C has trace 1: from λ = 1 on, P is diagonal).
        steps: proximal-gradient steps as the paper counts them, 1 to 100 (the last one's decay factor is 0).
        lr: the step size η, in (0, 100].
    """
    papers = (ISICE_BIBTEX,)

    def __init__(self, lam: float = 0.01, steps: int = 5, lr: float = 1.0):
        super().__init__()
        self.lam = float_option(self.name, 'lam', lam, MIN_LAM, 1.0, include_low=True)
        self.steps = int_option(self.name, 'steps', steps, 1, MAX_MATRIX_ITER)
        self.lr = float_option(self.name, 'lr', lr, 0.0, MAX_LR)

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        return sparse_inverse_covariance(cov, self.lam, self.steps, self.lr)

    def set_exportable(self, enable: bool = True) -> None:
        """isice has no export path: ONNX has no Cholesky factorisation (torch.export keeps the exact layer)."""
        if enable:
            raise ValueError('meta-layer isice has no ONNX export path (its exact inverse needs a Cholesky '
                             'factorisation, which ONNX lacks): deploy it with torch.export.export, which keeps it '
                             'exact (docs/models.md#deploying)')
        super().set_exportable(enable)

    def extra_repr(self) -> str:
        return f'lam={self.lam}, steps={self.steps}, lr={self.lr}'
