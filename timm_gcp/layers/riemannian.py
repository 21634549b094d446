"""RiemGCP's maps (Chen, Song, Wu, Liu, Sebe, "Understanding Matrix Function Normalizations in Covariance Pooling
through the Lens of Riemannian Geometry", ICLR 2025): what the GCP head hands its linear classifier, so that the
classifier is a Euclidean (EMLR) or tangent (TMLR) classifier of a Riemannian metric on SPD matrices.

Each map takes the meta-layer's output M = Σ^θ and θ (`MetaLayer.power`); derivations: docs/meta_layers.md.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
from timm.layers import is_exportable
from torch import nn
from torch.autograd.function import once_differentiable

from ..meta_layers import MetaLayer
from ..meta_layers.spectral import loewner_log, spectral_function
from ..ops import IndefiniteCovarianceError, batch_elements, compute_dtype, fp32_backward, fp32_island, psd_shifted
from ..ops.covariance import symmetrize

__all__ = ['RIEMANNIAN_MAPS', 'RiemannianMap', 'log_cholesky', 'matrix_log']


def matrix_log(m: torch.Tensor) -> torch.Tensor:
    """log M of symmetric PSD (B, d, d) M by eigendecomposition (`timm_gcp.ops.eigh`), eigenvalues clamped at
    max(eps·λ_max, √tiny) (eps, tiny of M's dtype: the floor keeps the gradient 1/λ finite), with the exact
    Daleckii–Krein backward (`loewner_log`)."""
    info = torch.finfo(m.dtype)
    return spectral_function(m, torch.log, loewner_log, info.eps, floor=info.tiny ** 0.5)


class _LogCholesky(torch.autograd.Function):
    """S -> (T + Tᵀ, info) for T = strict_lower(L) + diag(log diag L), L the Cholesky factor of S (`info` non-zero
    where S has none). Backward: S̄ = sym(L⁻ᵀ Φ(Lᵀ L̄) L⁻¹), Φ the lower triangle with halved diagonal."""

    @staticmethod
    def forward(ctx, shifted: torch.Tensor):
        factor, info = torch.linalg.cholesky_ex(shifted)
        diagonal = factor.diagonal(dim1=-2, dim2=-1)
        lower = factor.tril(-1) + torch.diag_embed(diagonal.log())
        ctx.mark_non_differentiable(info)
        ctx.save_for_backward(factor)
        return lower + lower.transpose(-1, -2), info

    @staticmethod
    @once_differentiable
    @fp32_backward
    def backward(ctx, grad_out: torch.Tensor, _):
        factor, = ctx.saved_tensors
        grad_factor = (grad_out + grad_out.transpose(-1, -2)).tril()
        grad_factor.diagonal(dim1=-2, dim2=-1).div_(factor.diagonal(dim1=-2, dim2=-1))
        phi = (factor.transpose(-1, -2) @ grad_factor).tril()
        phi.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        left = torch.linalg.solve_triangular(factor.transpose(-1, -2), phi, upper=True)  # L⁻ᵀ Φ
        grad = torch.linalg.solve_triangular(factor, left, upper=False, left=False)  # L⁻ᵀ Φ L⁻¹
        return symmetrize(grad)


def log_cholesky(m: torch.Tensor, what: str = 'log_cholesky input') -> torch.Tensor:
    """T + Tᵀ for T = strict_lower(L) + diag(log diag L), L the Cholesky factor of sym(M) + √eps·|tr M|·I (floored at
    √tiny; eps, tiny of M's dtype): the log-Cholesky coordinates of M as a symmetric matrix.

    M must be positive semi-definite up to the meta-layers' input tolerance: an eigenvalue below −√eps·|tr M| raises
    `IndefiniteCovarianceError` (a ValueError) naming the batch elements (checked in eager mode)."""
    out, info = _LogCholesky.apply(psd_shifted(m, floor=torch.finfo(m.dtype).tiny ** 0.5))
    if not torch.compiler.is_compiling():
        failed = (info != 0).tolist()
        if any(failed):
            raise IndefiniteCovarianceError(
                f'{what} is not positive semi-definite: an eigenvalue is below -√eps·|trace| '
                f'({batch_elements(failed)}), so it has no Cholesky factor')
    return out


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


# name -> (M, θ) -> the classifier's input; pow_emlr is M itself, the head without a map
_MAPS: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    'pow_emlr': lambda m, theta: m,
    'scalepow_emlr': lambda m, theta: m / theta,
    'pow_tmlr': lambda m, theta: (m - _eye_like(m)) / theta,
    'chol_tmlr': lambda m, theta: log_cholesky(m, 'riemannian chol_tmlr input (the meta-layer output)') / theta,
    'log_emlr': lambda m, theta: matrix_log(m) / theta,
}
RIEMANNIAN_MAPS: Tuple[str, ...] = tuple(_MAPS)

RIEMGCP_BIBTEX = """@inproceedings{chen2025understanding,
  title={Understanding Matrix Function Normalizations in Covariance Pooling through the Lens of Riemannian Geometry},
  author={Chen, Ziheng and Song, Yue and Wu, Xiao-Jun and Liu, Gaowen and Sebe, Nicu},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2025}
}"""


class RiemannianMap(nn.Module):
    """The map between a GCP head's meta-layer and its classifier (RiemGCP, ICLR 2025), for M = Σ^θ:

    - 'pow_emlr': M (the classic head, no map);
    - 'scalepow_emlr': M/θ;
    - 'pow_tmlr': (M − I)/θ;
    - 'chol_tmlr': the log-Cholesky coordinates of M over θ (`log_cholesky`; PSD input required);
    - 'log_emlr': log(M)/θ = log Σ (`matrix_log`), the θ → 0 limit of 'pow_tmlr'.

    Every map but 'pow_emlr' needs θ, the meta-layer's `power` (isqrt ½, eig its alpha, cov 1); `check_meta_layer`
    refuses a meta-layer without one (e.g. isice). Computes with autocast disabled, in float32 (float64 for float64).
    """

    def __init__(self, name: str = 'pow_emlr'):
        super().__init__()
        if not isinstance(name, str) or name not in _MAPS:
            raise ValueError(f'riemannian must be one of {", ".join(RIEMANNIAN_MAPS)}, got {name!r}')
        self.name = name
        if is_exportable():  # timm's layer config, as `timm.create_model(..., exportable=True)` sets it
            self.set_exportable(True)

    def set_exportable(self, enable: bool = True) -> None:
        """Refuse export mode for the maps ONNX cannot express ('chol_tmlr': Cholesky, 'log_emlr': an eigenvalue
        decomposition); the others are built from ONNX's ops as they are."""
        if enable and self.name in ('chol_tmlr', 'log_emlr'):
            raise ValueError(f"riemannian={self.name!r} has no ONNX export path (it needs "
                             f"{'a Cholesky factorisation' if self.name == 'chol_tmlr' else 'an eigendecomposition'}, "
                             f"which ONNX lacks): deploy it with torch.export.export, which keeps it exact "
                             f"(docs/models.md#deploying)")

    @property
    def papers(self) -> Tuple[str, ...]:
        """RiemGCP's BibTeX, for every map but 'pow_emlr' (the head as it was before RiemGCP)."""
        return () if self.name == 'pow_emlr' else (RIEMGCP_BIBTEX,)

    def check_meta_layer(self, meta_layer: MetaLayer) -> None:
        """Raise ValueError if this map needs θ and `meta_layer` computes no matrix power."""
        if self.name != 'pow_emlr' and meta_layer.power is None:
            raise ValueError(
                f"riemannian={self.name!r} maps Σ^θ with the meta-layer's θ, and meta-layer {meta_layer.name!r} "
                f"computes no matrix power: use riemannian='pow_emlr' with it, or a meta-layer with a power "
                f'(isqrt, eig, svd_*, mpa_lya, mtp_lya, cov)')

    def forward(self, m: torch.Tensor, power: Optional[float]) -> torch.Tensor:
        if self.name == 'pow_emlr' or m.numel() == 0:
            return m
        if power is None:
            raise ValueError(f'riemannian={self.name!r} needs the power θ of its input Σ^θ, got None')
        with fp32_island(m):
            return _MAPS[self.name](m.to(compute_dtype(m)), power)

    def extra_repr(self) -> str:
        return repr(self.name)
