"""The svd_* backward matrix L against an independent 40-digit mpmath evaluation of its definition, entry by entry.

L_ii = α λ_i^(α−1); off the diagonal L_ij = (λ_i^α − λ_j^α)·K_ij with K_ij = sign(λ_i − λ_j)·(1/a)·R(b/a),
a = max(λ_i, λ_j), b = min(λ_i, λ_j), R ≈ 1/(1 − x) as each layer defines it (direct sums, the Padé rationals from
their coefficients); svd_trunc: K_ij = sign(λ_i − λ_j)/max(|λ_i − λ_j|, 1/clip). Each float entry must lie within
32·eps·cond of the exact value, cond = 1 + (λ_i^α + λ_j^α)/|λ_i^α − λ_j^α| + (a + b)/(a − b): the cancellation in
the two differences is all that floating point may lose.
"""
import functools
from typing import Callable, Dict

import mpmath
import pytest
import torch

import timm_gcp
from timm_gcp.meta_layers.spectral import clamp_eigenvalues, published_pade_coefficients

ALPHA = 0.5
D = 24
LAYERS = {
    'svd_pade': ('svd_pade', {}),
    'svd_pade_bounded': ('svd_pade', {'approximant': 'bounded'}),
    'svd_taylor': ('svd_taylor', {}),
    'svd_pi': ('svd_pi', {}),
    'svd_trunc': ('svd_trunc', {}),
}
# each: generator -> (1, D) float64 eigenvalues
SPECTRA: Dict[str, Callable[[torch.Generator], torch.Tensor]] = {
    'random': lambda g: torch.rand(1, D, generator=g, dtype=torch.float64) * 10,
    'geometric': lambda g: torch.logspace(-6, 2, D, dtype=torch.float64)[None],
    'near_ties': lambda g: 1 + torch.arange(D, dtype=torch.float64)[None] * 1e-3,  # ratios 0.977 to 0.999
    'ties': lambda g: torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64).repeat_interleave(D // 3)[None],
    'rank_deficient': lambda g: torch.linalg.eigvalsh(
        (lambda f: f @ f.mT)(torch.randn(1, D, 6, generator=g, dtype=torch.float64))),
}


def create_layer(method: str, dtype: torch.dtype):
    name, kwargs = LAYERS[method]
    return timm_gcp.create_meta_layer(name, float64=dtype == torch.float64, **kwargs)


def spectrum(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(1, D) ascending eigenvalues in `dtype`, clamped as the layers clamp them."""
    evals = SPECTRA[kind](torch.Generator().manual_seed(0)).to(dtype).sort(dim=-1).values
    return clamp_eigenvalues(evals, torch.finfo(dtype).eps)


def exact_geometric(layer, x: mpmath.mpf) -> mpmath.mpf:
    """R(x) of `layer` in mpmath."""
    if layer.name == 'svd_taylor':
        return mpmath.fsum(x ** k for k in range(layer.degree + 1))
    if layer.name == 'svd_pi':
        return mpmath.fsum(x ** k for k in range(layer.num_iter))
    if layer.approximant == 'bounded':  # P = Σ_{k≤50} (51 − k) x^k, Q = 51 − Σ_{1≤k≤50} x^k
        return mpmath.fsum((51 - k) * x ** k for k in range(51)) / (51 - mpmath.fsum(x ** k for k in range(1, 51)))
    numerator, denominator = published_pade_coefficients(50)
    return mpmath.polyval(numerator[::-1], x) / mpmath.polyval(denominator[::-1], x)


@functools.lru_cache(maxsize=None)
def exact_loewner(method: str, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(1, D, D) L from the float eigenvalues, evaluated at 40 digits and rounded to float64 once."""
    layer = create_layer(method, dtype)
    out = torch.empty(1, D, D, dtype=torch.float64)
    with mpmath.workdps(40):
        evals = [mpmath.mpf(float(v)) for v in spectrum(kind, dtype)[0]]
        powered = [v ** ALPHA for v in evals]
        for i in range(D):
            out[0, i, i] = float(ALPHA * evals[i] ** (ALPHA - 1))
            for j in range(i + 1, D):
                gap = evals[i] - evals[j]
                if method == 'svd_trunc':
                    k = mpmath.sign(gap) / max(abs(gap), 1 / mpmath.mpf(layer.clip))
                else:
                    big, small = max(evals[i], evals[j]), min(evals[i], evals[j])
                    k = mpmath.sign(gap) / big * exact_geometric(layer, small / big)
                out[0, i, j] = out[0, j, i] = float((powered[i] - powered[j]) * k)
    return out


def condition(evals: torch.Tensor) -> torch.Tensor:
    """(1, D, D) cond of each entry (inf at ties), 1 on the diagonal."""
    evals = evals.double()
    powered = evals.pow(ALPHA)
    big, small = torch.maximum(evals[:, :, None], evals[:, None]), torch.minimum(evals[:, :, None], evals[:, None])
    cond = 1 + (powered[:, :, None] + powered[:, None]) / (powered[:, :, None] - powered[:, None]).abs() \
        + (big + small) / (big - small)
    return cond.diagonal_scatter(torch.ones_like(evals), dim1=-2, dim2=-1)


@pytest.mark.parametrize('kind', list(SPECTRA))
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['float64', 'float32'])
@pytest.mark.parametrize('method', list(LAYERS))
def test_loewner_matches_exact_definition(method, dtype, kind):
    evals = spectrum(kind, dtype)
    loewner = create_layer(method, dtype).loewner(evals, evals.pow(ALPHA), ALPHA)
    assert loewner.dtype == dtype
    torch.testing.assert_close(loewner, loewner.mT, rtol=0, atol=0, equal_nan=True)  # symmetric, NaN where NaN
    exact, cond = exact_loewner(method, kind, dtype), condition(evals)
    tie = torch.isinf(cond)
    if method == 'svd_pade':  # the published approximant is infinite at ties: left to the overflow guard
        assert torch.equal(~torch.isfinite(loewner), tie)
    else:
        assert torch.isfinite(loewner).all() and (loewner[tie] == 0).all()  # λ_i^α − λ_j^α = 0 at a tie
    error = (loewner.double() - exact).abs()[~tie]
    assert (error <= 32 * torch.finfo(dtype).eps * cond[~tie] * exact.abs()[~tie]).all(), error.max()


def test_published_pade_is_non_finite_exactly_at_ties():
    evals = spectrum('ties', torch.float64)
    loewner = create_layer('svd_pade', torch.float64).loewner(evals, evals.pow(ALPHA), ALPHA)
    tie = (evals[:, :, None] == evals[:, None]) & ~torch.eye(D, dtype=torch.bool)
    assert tie.any() and torch.equal(~torch.isfinite(loewner), tie)  # left to the overflow guard, as published
@pytest.mark.parametrize('method', sorted(LAYERS))
def test_rank_deficient_gradient_against_closed_form(method):
    """M < d: the clamped eigenvalues tie. Closed-form reference in float64: L_ij = (λ_i^½ − λ_j^½)/(λ_i − λ_j) for
    distinct eigenvalues, 0 for a tied pair (the eigenvector rule's limit once the guard acts), ½λ_i^(−½) on the
    diagonal; the published Padé must not turn the tied pairs into a zero gradient."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 24, 10, generator=g, dtype=torch.float64)  # rank 9 < 24
    cov = timm_gcp.covariance(features).requires_grad_()
    grad_out = torch.randn(2, 24, 24, generator=g, dtype=torch.float64)
    # a clamp far above round-off (~1e-15·λ_max): every null-space eigenvalue ties exactly, whatever LAPACK returns
    eps = 1e-12
    name, kwargs = LAYERS[method]
    layer = timm_gcp.create_meta_layer(name, float64=True, eps=eps, **kwargs)
    grad, = torch.autograd.grad((layer(cov) * grad_out).sum(), cov)

    evals, evecs = torch.linalg.eigh(cov.detach())
    evals = clamp_eigenvalues(evals, eps)
    roots = evals.sqrt()
    gap = evals[:, :, None] - evals[:, None, :]
    tied = gap == 0
    loewner = torch.where(tied, torch.zeros_like(gap),
                          (roots[:, :, None] - roots[:, None, :]) / torch.where(tied, 1, gap))
    loewner.diagonal(dim1=-2, dim2=-1).copy_(0.5 / roots)
    sym = 0.5 * (grad_out + grad_out.mT)
    expected = evecs @ ((evecs.mT @ sym @ evecs) * loewner) @ evecs.mT
    assert tied.sum() > 2 * 24  # ties off the diagonal exist
    assert grad.abs().max() > 0
    if method == 'svd_pi':  # 20 terms of the geometric series: close to, not equal to, the closed form
        assert torch.linalg.matrix_norm(grad - expected).max() < 0.5 * torch.linalg.matrix_norm(expected).max()
    else:
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
