"""Exact-eigendecomposition meta-layers: MPN-COV's matrix power (`eig`) and the ICCV'21 SVD family (`svd_*`).

One forward for all: Σ = V diag(λ) Vᵀ (`timm_gcp.ops.eigh`), eigenvalues clamped at max(eps·λ_max, 1.2e-38),
out = V diag(λ^α) Vᵀ. They differ in the backward dΣ = V [(Vᵀ sym(G) V) ∘ L] Vᵀ: `eig` uses the exact divided
differences L, `svd_*` the eigenvector rule with an approximated 1/(λ_i − λ_j). Derivations: docs/meta_layers.md.
"""
import functools
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..ops.covariance import cached_tensors, fp32_backward, symmetrize
from ..ops import check_eigh_backend, eigh, newton_power, power_fraction
from ..ops.newton import MAX_ROOT_DENOMINATOR
from .options import MAX_SERIES_TERMS, bool_option, float_option, int_option, optional
from .registry import MetaLayer, register_meta_layer

__all__ = [
    'SpectralPower', 'MatrixPower', 'SvdPade', 'SvdTaylor', 'SvdPowerIteration', 'SvdTrunc',
    'clamp_eigenvalues', 'geometric_partial_sum', 'loewner_log', 'loewner_power', 'pade_geometric_coefficients',
    'published_pade_coefficients', 'polyval', 'replace_non_finite', 'spectral_function',
]

EIGENVALUE_FLOOR = torch.finfo(torch.float32).tiny
EXPORT_TOLERANCE = 2e-2  # of the largest output entry: the exact layers move by 1e-3 to 1e-2 when their float32
# covariance is rounded differently (measured on trained features, docs/models.md#deploying)


def clamp_eigenvalues(evals: torch.Tensor, eps: float, floor: float = EIGENVALUE_FLOOR) -> torch.Tensor:
    """Clamp (B, d) eigenvalues from below at max(eps·λ_max, floor) per matrix (floor: 1.2e-38 by default)."""
    return torch.maximum(evals, (eps * evals.amax(dim=-1, keepdim=True)).clamp_min(floor))


def _larger_smaller(first: torch.Tensor, second: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise max(first, second) and min(first, second)."""
    return torch.maximum(first, second), torch.minimum(first, second)


@cached_tensors
def _pair_index(d: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """The unordered pairs i < j of d eigenvalues (strict upper triangle, row-major): i, j, and the positions
    i·d + j and j·d + i of their two entries in a flattened d × d matrix."""
    first, second = torch.triu_indices(d, d, offset=1, device=device)
    return first, second, first * d + second, second * d + first


def loewner_log(evals: torch.Tensor) -> torch.Tensor:
    """(B, d, d) divided differences (log λ_i − log λ_j)/(λ_i − λ_j), 1/λ_i on ties, for positive eigenvalues.

    With a ≥ b it is log1p((a − b)/b)/(a − b): no difference of logarithms (a − b is exact when a ≤ 2b)."""
    big, small = _larger_smaller(evals.unsqueeze(-1), evals.unsqueeze(-2))
    gap = big - small
    tie = gap == 0
    return torch.where(tie, small.reciprocal(), torch.log1p(gap / small) / torch.where(tie, torch.ones_like(gap), gap))


def loewner_power(evals: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, d, d) divided differences (λ_i^α − λ_j^α)/(λ_i − λ_j), α λ_i^(α−1) on ties, for positive eigenvalues.

    With a ≥ b and t = log(a/b) it is a^(α−1)·expm1(−αt)/expm1(−t): no division by λ_i − λ_j (for α = ½ it is
    1/(√λ_i + √λ_j))."""
    big, small = _larger_smaller(evals.unsqueeze(-1), evals.unsqueeze(-2))
    t = torch.log1p((big - small) / small)
    tie = t == 0
    ratio = torch.expm1(-alpha * t) / torch.where(tie, torch.ones_like(t), torch.expm1(-t))
    return big.pow(alpha - 1) * torch.where(tie, torch.full_like(t, alpha), ratio)


@cached_tensors
def _descending_coefficients(coeffs: Tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`coeffs`, highest power first, as a tensor (built once per dtype and device)."""
    return torch.tensor(coeffs[::-1], dtype=dtype, device=device)


def polyval(coeffs: Sequence, x: torch.Tensor) -> torch.Tensor:
    """Σ_k coeffs[k]·x^k by Horner's rule, each step a multiply and an add rounded separately.

    `coeffs` holds ascending coefficients: floats, or m-tuples of floats to evaluate m polynomials at once (sharing
    each step's two kernels); the output has x's shape, or (m, *x.shape)."""
    table = _descending_coefficients(tuple(coeffs), x.dtype, x.device)
    stacked = table.shape[1:]
    leading, *rest = table.view(*table.shape, *[1] * x.dim())  # each coefficient broadcasts over x
    out = leading.expand(stacked + x.shape).clone()
    for coefficient in rest:
        out.mul_(x).add_(coefficient)  # not addcmul's single rounding: the published Padé is ill-conditioned near 1
    return out


def geometric_partial_sum(x: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Σ_{k<num_terms} x^k, the Taylor polynomial of 1/(1 − x) of degree num_terms − 1, in O(log num_terms) steps:
    S_2m = S_m·(1 + x^m), S_m+1 = 1 + x·S_m (all terms positive on [0, 1], no cancellation)."""
    total, power = torch.ones_like(x), x
    for bit in bin(num_terms)[3:]:
        total.mul_(1 + power)
        power = power * power
        if bit == '1':
            total.mul_(x).add_(1)
            power.mul_(x)
    return total


def pade_geometric_coefficients(n: int = 50):
    """Numerator and denominator coefficients (ascending powers) of a [n/n] approximant of 1/(1 − x) that stays
    finite at x = 1 (`svd_pade`'s `approximant='bounded'`): P(x) = Σ_{k≤n} (n+1−k) x^k, Q(x) = (n+1) − Σ_{1≤k≤n} x^k,
    exact through x^n, no poles on [0, 1] (derivation: docs/meta_layers.md)."""
    numerator = [float(n + 1 - k) for k in range(n + 1)]
    denominator = [float(n + 1)] + [-1.0] * n
    return numerator, denominator


@functools.lru_cache(maxsize=None)
def published_pade_coefficients(n: int = 50) -> Tuple[List[float], List[float]]:
    """Numerator and denominator coefficients (ascending powers) of the [n/n] Padé approximant of 1/(1 − x) as the
    ICCV'21 release computes it (mpmath at 20 digits from numerically differentiated Taylor coefficients): 1/(1 − x)
    in floating point, infinite at ties. Computed once, on first use."""
    from mpmath import mp, mpf, pade, taylor  # a dependency of torch (through sympy)
    with mp.workdps(20):
        numerator, denominator = pade(taylor(lambda x: mpf(1) / (1 - x), 0, 2 * n), n, n)
    return [float(c) for c in numerator], [float(c) for c in denominator]


def replace_non_finite(grad: torch.Tensor) -> torch.Tensor:
    """Overflow guard of the ICCV'21 layers: NaN -> 0, ±inf -> ± the largest finite magnitude of that matrix."""
    finite = torch.isfinite(grad)
    largest = torch.where(finite, grad.abs(), torch.zeros_like(grad)).amax(dim=(-2, -1), keepdim=True)
    grad = torch.where(torch.isnan(grad), torch.zeros_like(grad), grad)
    return torch.where(torch.isinf(grad), torch.sign(grad) * largest, grad)


class _SpectralFn(torch.autograd.Function):
    """Σ -> V diag(fn(clamp(λ))) Vᵀ with the backward V [(Vᵀ sym(G) V) ∘ L] Vᵀ, L = divided_differences(clamp(λ))."""

    @staticmethod
    def forward(ctx, cov, fn, divided_differences, eps, floor, eig_dtype, eigh_backend, guard):
        evals, evecs = eigh(symmetrize(cov.to(eig_dtype)), eigh_backend)
        evals = clamp_eigenvalues(evals, eps, floor)
        ctx.save_for_backward(evals, evecs)
        ctx.divided_differences, ctx.guard = divided_differences, guard
        return ((evecs * fn(evals).unsqueeze(-2)) @ evecs.transpose(-1, -2)).to(cov.dtype)

    @staticmethod
    @fp32_backward
    def backward(ctx, grad_out):
        evals, evecs = ctx.saved_tensors
        grad_eig = evecs.transpose(-1, -2) @ symmetrize(grad_out.to(evecs.dtype)) @ evecs
        loewner = ctx.divided_differences(evals)
        if ctx.guard:  # per entry of L: one tied pair's 0·inf must not turn the whole product into NaN
            loewner = replace_non_finite(loewner)
        grad = (evecs @ (grad_eig * loewner) @ evecs.transpose(-1, -2)).to(grad_out.dtype)
        return (replace_non_finite(grad) if ctx.guard else grad), None, None, None, None, None, None, None


def spectral_function(
        m: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor],
        divided_differences: Callable[[torch.Tensor], torch.Tensor],
        eps: float,
        floor: float = EIGENVALUE_FLOOR,
        eig_dtype: Optional[torch.dtype] = None,
        eigh_backend: str = 'auto',
        guard: bool = False,
) -> torch.Tensor:
    """f(M) = V diag(fn(λ)) Vᵀ of symmetric (B, d, d) M = V diag(λ) Vᵀ, its eigenvalues clamped at
    max(eps·λ_max, floor), with the backward V [(Vᵀ sym(G) V) ∘ L] Vᵀ for L = divided_differences(λ), the (B, d, d)
    divided differences of f (`loewner_power`, `loewner_log`). `eig_dtype` (default: M's) is the dtype of the
    eigendecomposition and the backward; `guard` replaces their non-finite entries (`replace_non_finite`)."""
    return _SpectralFn.apply(m, fn, divided_differences, eps, floor, eig_dtype or m.dtype, eigh_backend, guard)


class SpectralPower(MetaLayer):
    """Base of the exact layers: matrix power Σ^α from an exact eigendecomposition; subclasses choose the backward.

    Export path (ONNX has no eigendecomposition): `timm_gcp.ops.newton_power` in float64, Σ^α by a coupled Newton
    iteration with the clamp max(λ, ε·λ_max)^α replaced by the smooth (λ² + ε²·λ̂²)^(α/2), ε at least float32's
    epsilon (below it the eigenvalues of a float32 covariance are rounding noise); α must be a fraction with a
    denominator up to 16.

    Args:
        alpha: the power, in (0, 2] (½: matrix square root).
        eps: eigenvalue clamp relative to λ_max, in [0, 1]; None: machine epsilon of the eigendecomposition dtype.
        float64: run eigendecomposition and backward in float64 (the output keeps the input's compute dtype).
        eigh_backend: the `timm_gcp.ops.eigh` backend: 'auto' (cuSOLVER on CUDA, else torch), 'torch' or 'cusolver'.
    """
    overflow_guard = False
    export_tolerance = EXPORT_TOLERANCE

    def __init__(
            self,
            alpha: float = 0.5,
            eps: Optional[float] = None,
            float64: bool = False,
            eigh_backend: str = 'auto',
    ):
        super().__init__()
        self.alpha = float_option(self.name, 'alpha', alpha, 0., 2.)
        self.eps = optional(float_option, self.name, 'eps', eps, 0., 1., include_low=True)
        self.float64 = bool_option(self.name, 'float64', float64)
        self.eigh_backend = check_eigh_backend(eigh_backend, f'{self.name} option eigh_backend')

    def loewner(self, evals: torch.Tensor, powered: torch.Tensor, alpha: float) -> torch.Tensor:
        """(B, d, d) symmetric matrix L of the backward dΣ = V [(Vᵀ sym(G) V) ∘ L] Vᵀ."""
        raise NotImplementedError

    def eig_dtype(self, cov: torch.Tensor) -> torch.dtype:
        return torch.float64 if self.float64 else cov.dtype

    def clamp_eps(self, eig_dtype: torch.dtype) -> float:
        """The eigenvalue clamp relative to λ_max."""
        return torch.finfo(eig_dtype).eps if self.eps is None else self.eps

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        eig_dtype = self.eig_dtype(cov)
        alpha = self.alpha
        return spectral_function(cov, lambda evals: evals.pow(alpha),
                                 lambda evals: self.loewner(evals, evals.pow(alpha), alpha), self.clamp_eps(eig_dtype),
                                 eig_dtype=eig_dtype, eigh_backend=self.eigh_backend, guard=self.overflow_guard)

    @property
    def power(self) -> float:
        return self.alpha

    def export_normalize(self, cov: torch.Tensor) -> torch.Tensor:
        floor = max(self.clamp_eps(self.eig_dtype(cov)), torch.finfo(cov.dtype).eps)
        return newton_power(symmetrize(cov.double()), self.alpha, floor).to(cov.dtype)

    def set_exportable(self, enable: bool = True) -> None:
        if enable and power_fraction(self.alpha / 2) is None:
            raise ValueError(f'{self.name} option alpha={self.alpha} has no export path: it is computed for fractions '
                             f'q/p with p <= {MAX_ROOT_DENOMINATOR // 2} (e.g. 0.5, 0.25, 0.3, 2/3)')
        super().set_exportable(enable)

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, eps={self.eps}, float64={self.float64}, eigh_backend={self.eigh_backend}'


@register_meta_layer('eig')
class MatrixPower(SpectralPower):
    """MPN-COV matrix power normalisation (Li et al., ICCV 2017) with the exact Daleckii–Krein backward."""

    def loewner(self, evals: torch.Tensor, powered: torch.Tensor, alpha: float) -> torch.Tensor:
        return loewner_power(evals, alpha)


SVD_PADE_BIBTEX = """@inproceedings{song2021approximate,
  title={Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?},
  author={Song, Yue and Sebe, Nicu and Wang, Wei},
  booktitle={IEEE International Conference on Computer Vision (ICCV)},
  year={2021}
}"""

class _EigenvectorRule(SpectralPower):
    """ICCV'21 layers (Song, Sebe, Wang, "Why Approximate Matrix Square Root Outperforms Accurate SVD in Global
    Covariance Pooling?"): L_ij = (λ_i^α − λ_j^α)·K_ij with K_ij = ±(1/a)·R(b/a) ≈ 1/(λ_i − λ_j); float64 by default
    as published, non-finite gradient entries replaced (`replace_non_finite`)."""
    papers = (SVD_PADE_BIBTEX,)
    overflow_guard = True

    def __init__(self, alpha: float = 0.5, eps: Optional[float] = None, float64: bool = True,
                 eigh_backend: str = 'auto'):
        super().__init__(alpha=alpha, eps=eps, float64=float64, eigh_backend=eigh_backend)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        """R(x) ≈ 1/(1 − x) on (0, 1]; finite at x = 1 but for the published Padé's (the overflow guard acts)."""
        raise NotImplementedError

    def off_diagonal(self, evals_i: torch.Tensor, evals_j: torch.Tensor, powered_i: torch.Tensor,
                     powered_j: torch.Tensor) -> torch.Tensor:
        """(λ_i^α − λ_j^α)·K_ij for pairs of eigenvalues λ_i, λ_j and their powers λ_i^α, λ_j^α (same shapes)."""
        big, small = _larger_smaller(evals_i, evals_j)
        # |λ_i^α − λ_j^α| / max(λ_i, λ_j) first: stays finite even where R(x)/max(λ_i, λ_j) would not
        spread = (powered_i - powered_j).abs_().div_(big)
        return spread.mul_(self.geometric(small.div_(big)))

    def loewner(self, evals: torch.Tensor, powered: torch.Tensor, alpha: float) -> torch.Tensor:
        """L_ij = L_ji = `off_diagonal` of the pair i < j (evaluated once per pair), L_ii = α λ_i^(α−1)."""
        *batch, d = evals.shape
        first, second, upper, lower = (index.expand(*batch, -1) for index in _pair_index(d, evals.device))
        pairs = self.off_diagonal(
            evals.gather(-1, first), evals.gather(-1, second), powered.gather(-1, first), powered.gather(-1, second))
        out = evals.new_empty(*batch, d * d).scatter_(-1, upper, pairs).scatter_(-1, lower, pairs).view(*batch, d, d)
        out.diagonal(dim1=-2, dim2=-1).copy_(alpha * evals.pow(alpha - 1))
        return out


@register_meta_layer('svd_pade')
class SvdPade(_EigenvectorRule):
    """SVD-Padé (Song et al., ICCV 2021): K from a [50/50] Padé approximant of 1/(1 − x): the release's
    (`approximant='published'`, infinite at ties, then the overflow guard) or one bounded at ties (`'bounded'`)."""
    APPROXIMANTS = {'published': published_pade_coefficients, 'bounded': pade_geometric_coefficients}

    def __init__(self, approximant: str = 'published', **kwargs):
        super().__init__(**kwargs)
        if approximant not in self.APPROXIMANTS:
            raise ValueError(f'{self.name} option approximant must be one of {sorted(self.APPROXIMANTS)}, '
                             f'got {approximant!r}')
        self.approximant = approximant
        self.coefficients = list(zip(*self.APPROXIMANTS[approximant](50)))  # (numerator, denominator) per power

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        numerator, denominator = polyval(self.coefficients, x)
        return numerator.div_(denominator)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, approximant={self.approximant}'


@register_meta_layer('svd_taylor')
class SvdTaylor(_EigenvectorRule):
    """SVD-Taylor (Wang et al., TPAMI 2021; Song et al., ICCV 2021): K from the degree-`degree` Taylor polynomial
    of 1/(1 − x) (100 by default)."""

    def __init__(self, degree: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.degree = int_option(self.name, 'degree', degree, 0, MAX_SERIES_TERMS)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        return geometric_partial_sum(x, self.degree + 1)


@register_meta_layer('svd_pi')
class SvdPowerIteration(_EigenvectorRule):
    """SVD-PI (Wang et al., NeurIPS 2019; Song et al., ICCV 2021): the gradient of `num_iter` power iterations
    (20 by default) started at the converged eigenvectors, evaluated in closed form as the `num_iter`-term partial
    geometric sum it equals in the eigenbasis."""

    def __init__(self, num_iter: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.num_iter = int_option(self.name, 'num_iter', num_iter, 1, MAX_SERIES_TERMS)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        return geometric_partial_sum(x, self.num_iter)


@register_meta_layer('svd_trunc')
class SvdTrunc(_EigenvectorRule):
    """SVD-Trunc (Song et al., ICCV 2021): the exact K_ij = 1/(λ_i − λ_j) with |K_ij| clipped at `clip` (1e10)."""

    def __init__(self, clip: float = 1e10, **kwargs):
        super().__init__(**kwargs)
        self.clip = float_option(self.name, 'clip', clip, 0., 1e30)

    def off_diagonal(self, evals_i: torch.Tensor, evals_j: torch.Tensor, powered_i: torch.Tensor,
                     powered_j: torch.Tensor) -> torch.Tensor:
        gap = evals_i - evals_j
        k = torch.sign(gap).div_(gap.abs().clamp_min_(1.0 / self.clip))
        return (powered_i - powered_j).mul_(k)
