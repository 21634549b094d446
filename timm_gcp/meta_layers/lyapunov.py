"""MPA-Lya and MTP-Lya (Song, Sebe, Wang, "Fast Differentiable Matrix Square Root", ICLR 2022).

Forward: √A as a matrix Padé or Taylor polynomial of the Frobenius-normalised A. Backward: the exact square root's
gradient, a Lyapunov equation solved by matrix-sign iteration. Derivations: docs/meta_layers.md.
"""
from typing import Callable, List, Sequence

import torch

from ..ops import newton_inverse
from ..ops.covariance import fp32_backward, symmetrize
from .options import MAX_MATRIX_ITER, int_option
from .registry import MetaLayer, register_meta_layer

__all__ = ['MpaLya', 'MtpLya', 'MPA_NUMERATOR', 'MPA_DENOMINATOR', 'MPA_DENOMINATOR_MIN', 'sqrt_taylor_coefficients',
           'solve_lyapunov']

# [5/5] Padé approximant of √(1 − z): P(Z) = Σ p_k Z^k, Q(Z) = Σ q_k Z^k
MPA_NUMERATOR = (1.0, -2.75, 2.75, -1.203125, 0.21484375, -0.0107421875)
MPA_DENOMINATOR = (1.0, -2.25, 1.75, -0.546875, 0.05859375, -0.0009765625)
# Q decreases on [0, 1]: its eigenvalues for Z = I − A/‖A‖_F (spectrum in [0, 1]) lie in [Q(1), 1]
MPA_DENOMINATOR_MIN = sum(MPA_DENOMINATOR)


def sqrt_taylor_coefficients(degree: int) -> List[float]:
    """Taylor coefficients of √(1 − z) up to z^degree: c_k = (−1)^k·binom(½, k)."""
    coeffs = [1.0]
    for k in range(1, degree + 1):
        coeffs.append(coeffs[-1] * (k - 1.5) / k)
    return coeffs


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def _matrix_polynomials(z: torch.Tensor, *coeff_lists: Sequence[float]) -> List[torch.Tensor]:
    """Σ_k c_k Z^k for each coefficient list, sharing the powers of Z."""
    powers = [_eye_like(z).expand_as(z), z]
    for _ in range(max(len(c) for c in coeff_lists) - 2):
        powers.append(powers[-1] @ z)
    # each sum starts from its constant term (Python's sum starts from int 0: TorchScript's ONNX export fails on it)
    return [sum((c * p for c, p in zip(coeffs[1:], powers[1:])), coeffs[0] * powers[0]) for coeffs in coeff_lists]


def _frobenius(m: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1) Frobenius norms, summed in float64 so that float32 entries up to ~1e38 do not overflow."""
    norm = torch.linalg.matrix_norm(m.double()).to(m.dtype)
    return norm[..., None, None].clamp_min(torch.finfo(m.dtype).tiny ** 0.5)


def solve_lyapunov(y: torch.Tensor, g: torch.Tensor, num_iter: int = 8) -> torch.Tensor:
    """X with Y X + X Y = G for symmetric positive (semi)definite Y, by `num_iter` Newton–Schulz steps on the sign
    of [[Y, −G], [0, −Y]] (which is [[I, −2X], [0, −I]]); directions of Y far below ‖Y‖_F stay bounded."""
    scale = _frobenius(y)
    b, d = y / scale, g / scale
    eye3 = 3.0 * _eye_like(y)
    for _ in range(num_iter):
        b2 = b @ b
        d = 0.5 * (b @ d @ b - b2 @ d + d @ (eye3 - b2))
        b = 0.5 * b @ (eye3 - b2)
    return 0.5 * d


class _LyapunovSqrtFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov, approx_sqrt, num_iter):
        y = approx_sqrt(symmetrize(cov))
        ctx.save_for_backward(y)
        ctx.num_iter = num_iter
        return y

    @staticmethod
    @fp32_backward
    def backward(ctx, grad_out):
        y, = ctx.saved_tensors
        return symmetrize(solve_lyapunov(y, symmetrize(grad_out), ctx.num_iter)), None, None


MPA_LYA_BIBTEX = """@inproceedings{song2022fast,
  title={Fast Differentiable Matrix Square Root},
  author={Song, Yue and Sebe, Nicu and Wang, Wei},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2022}
}"""

def _frobenius_sqrt(cov: torch.Tensor, sqrt_normalized: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """√A = √(I − Z)·√‖A‖_F with Z = I − A/‖A‖_F, given `sqrt_normalized`: Z -> √(I − Z)."""
    norm = _frobenius(cov)
    return symmetrize(sqrt_normalized(_eye_like(cov) - cov / norm)) * norm.sqrt()


class _LyapunovSqrt(MetaLayer):
    """Approximate matrix square root forward, Lyapunov backward solved in `lya_iter` (1 to 100) sign iterations."""
    papers = (MPA_LYA_BIBTEX,)
    power = 0.5

    def __init__(self, lya_iter: int = 8):
        super().__init__()
        self.lya_iter = int_option(self.name, 'lya_iter', lya_iter, 1, MAX_MATRIX_ITER)

    def sqrt_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """√(I − Z) for Z = I − A/‖A‖_F."""
        raise NotImplementedError

    def approx_sqrt(self, cov: torch.Tensor) -> torch.Tensor:
        return _frobenius_sqrt(cov, self.sqrt_normalized)

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        return _LyapunovSqrtFn.apply(cov, self.approx_sqrt, self.lya_iter)


@register_meta_layer('mpa_lya')
class MpaLya(_LyapunovSqrt):
    """MPA-Lya (Song et al., ICLR 2022): [5/5] matrix Padé approximant Q(Z)⁻¹P(Z) of √(1 − z), Lyapunov backward.
    Export path (ONNX has no linear solve): Q⁻¹ by Newton–Schulz (`timm_gcp.ops.newton_inverse`), to the compute
    dtype's precision in 10 iterations (float32), as the spectrum of Q lies in [Q(1), 1] = [0.0107, 1]."""
    export_tolerance = 1e-3  # the float32 solve itself is 1e-3 off float64 on trained features (docs/models.md)

    def sqrt_normalized(self, z: torch.Tensor) -> torch.Tensor:
        p, q = _matrix_polynomials(z, MPA_NUMERATOR, MPA_DENOMINATOR)
        return torch.linalg.solve(q, p)

    def export_normalize(self, cov: torch.Tensor) -> torch.Tensor:
        return _frobenius_sqrt(symmetrize(cov), self._sqrt_normalized_without_solve)

    def _sqrt_normalized_without_solve(self, z: torch.Tensor) -> torch.Tensor:
        p, q = _matrix_polynomials(z, MPA_NUMERATOR, MPA_DENOMINATOR)
        return newton_inverse(q, MPA_DENOMINATOR_MIN) @ p

    def extra_repr(self) -> str:
        return f'lya_iter={self.lya_iter}'


@register_meta_layer('mtp_lya')
class MtpLya(_LyapunovSqrt):
    """MTP-Lya (Song et al., ICLR 2022): degree-`degree` (10; 1 to 100) matrix Taylor polynomial of √(1 − z),
    Lyapunov backward."""

    def __init__(self, degree: int = 10, lya_iter: int = 8):
        super().__init__(lya_iter)
        self.degree = int_option(self.name, 'degree', degree, 1, MAX_MATRIX_ITER)
        self.coeffs = sqrt_taylor_coefficients(degree)

    def sqrt_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return _matrix_polynomials(z, self.coeffs)[0]

    def extra_repr(self) -> str:
        return f'degree={self.degree}, lya_iter={self.lya_iter}'
