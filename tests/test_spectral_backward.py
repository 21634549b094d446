"""The svd_* backward matrix L, evaluated once per eigenvalue pair, against a full (i, j) evaluation of every entry.

The reference below is the evaluation the layers used before pair evaluation: every entry of the (B, d, d) matrix
from max/min of the two eigenvalues, Horner with a separate multiply and add.
"""
from typing import Callable, Dict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import timm_gcp
from timm_gcp.meta_layers.spectral import SvdPade, SvdTaylor, SvdTrunc, clamp_eigenvalues

ALPHA = 0.5
LAYERS = {
    'svd_pade': ('svd_pade', {}),
    'svd_pade_bounded': ('svd_pade', {'approximant': 'bounded'}),
    'svd_taylor': ('svd_taylor', {}),
    'svd_pi': ('svd_pi', {}),
    'svd_trunc': ('svd_trunc', {}),
}
# each: generator -> (2, 24) float64 eigenvalues
SPECTRA: Dict[str, Callable[[torch.Generator], torch.Tensor]] = {
    'random': lambda g: torch.rand(2, 24, generator=g, dtype=torch.float64) * 10,
    'geometric': lambda g: torch.logspace(-6, 2, 24, dtype=torch.float64).expand(2, -1),
    'near_ties': lambda g: 1 + torch.arange(48, dtype=torch.float64).view(2, 24) * 1e-3,  # ratios 0.977 to 0.999
    'ties': lambda g: torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64).repeat_interleave(8).expand(2, -1),
    'rank_deficient': lambda g: torch.linalg.eigvalsh(
        (lambda f: f @ f.mT)(torch.randn(2, 24, 6, generator=g, dtype=torch.float64))),
}


def create_layer(method: str, dtype: torch.dtype):
    name, kwargs = LAYERS[method]
    return timm_gcp.create_meta_layer(name, float64=dtype == torch.float64, **kwargs)


def spectrum(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(2, 24) ascending eigenvalues in `dtype`, clamped as the layers clamp them."""
    evals = SPECTRA[kind](torch.Generator().manual_seed(0)).to(dtype).sort(dim=-1).values
    return clamp_eigenvalues(evals, torch.finfo(dtype).eps)


def horner(coeffs, x: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def reference_geometric(layer, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, SvdPade):
        numerator, denominator = SvdPade.APPROXIMANTS[layer.approximant](50)
        return horner(numerator, x) / horner(denominator, x)
    total, power = torch.ones_like(x), x
    for bit in bin(layer.degree + 1 if isinstance(layer, SvdTaylor) else layer.num_iter)[3:]:
        total, power = total * (1 + power), power * power
        if bit == '1':
            total, power = 1 + x * total, power * x
    return total


def reference_loewner(layer, evals: torch.Tensor) -> torch.Tensor:
    powered = evals.pow(ALPHA)
    evals_i, evals_j, powered_i, powered_j = evals[:, :, None], evals[:, None], powered[:, :, None], powered[:, None]
    if isinstance(layer, SvdTrunc):
        gap = evals_i - evals_j
        off_diagonal = (powered_i - powered_j) * (torch.sign(gap) / gap.abs().clamp_min(1.0 / layer.clip))
    else:
        big, small = torch.maximum(evals_i, evals_j), torch.minimum(evals_i, evals_j)
        off_diagonal = (powered_i - powered_j).abs() / big * reference_geometric(layer, small / big)
    return torch.diagonal_scatter(off_diagonal, ALPHA * evals.pow(ALPHA - 1), dim1=-2, dim2=-1)


@pytest.mark.parametrize('kind', list(SPECTRA))
@pytest.mark.parametrize('dtype, rtol', [(torch.float64, 1e-13), (torch.float32, 1e-5)], ids=['float64', 'float32'])
@pytest.mark.parametrize('method', list(LAYERS))
def test_pair_evaluation_matches_full_matrix(method, dtype, rtol, kind):
    layer = create_layer(method, dtype)
    evals = spectrum(kind, dtype)
    loewner = layer.loewner(evals, evals.pow(ALPHA), ALPHA)
    assert loewner.dtype == dtype
    # same ±inf and NaN positions, finite entries within rtol
    torch.testing.assert_close(loewner, reference_loewner(layer, evals), rtol=rtol, atol=0, equal_nan=True)


def test_published_pade_is_non_finite_exactly_at_ties():
    evals = spectrum('ties', torch.float64)
    loewner = create_layer('svd_pade', torch.float64).loewner(evals, evals.pow(ALPHA), ALPHA)
    tie = (evals[:, :, None] == evals[:, None]) & ~torch.eye(24, dtype=torch.bool)
    assert torch.equal(~torch.isfinite(loewner), tie)  # left to the overflow guard, as published


class OpCounter(TorchDispatchMode):
    """Counts the ops run (views excluded), and those of them whose result has at least `size` elements."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.ops, self.large_ops = size, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops += 1
            self.large_ops += isinstance(out, torch.Tensor) and out.numel() >= self.size
        return out


@pytest.mark.parametrize('method', list(LAYERS))
def test_only_assembly_touches_the_full_matrix(method):
    layer = create_layer(method, torch.float64)
    evals = spectrum('random', torch.float64)
    with OpCounter(size=evals.shape[0] * 24 * 24) as counter:
        layer.loewner(evals, evals.pow(ALPHA), ALPHA)
    assert counter.large_ops <= 3  # allocate L, mirror the pair values into it (the rest runs on pairs)
    if isinstance(layer, SvdPade):  # Horner: a multiply and an add per power for numerator and denominator together
        assert counter.ops < 3 * 51  # (four per power if the two were evaluated one after the other)


@pytest.mark.parametrize('method', sorted(LAYERS))
def test_rank_deficient_gradient_against_closed_form(method):
    """M < d: the clamped eigenvalues tie. Closed-form reference in float64: L_ij = (λ_i^½ − λ_j^½)/(λ_i − λ_j) for
    distinct eigenvalues, 0 for a tied pair (the eigenvector rule's limit once the guard acts), ½λ_i^(−½) on the
    diagonal; the published Padé must not turn the tied pairs into a zero gradient."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 24, 10, generator=g, dtype=torch.float64)  # rank 9 < 24
    cov = timm_gcp.covariance(features).requires_grad_()
    grad_out = torch.randn(2, 24, 24, generator=g, dtype=torch.float64)
    layer = create_layer(method, torch.float64)
    grad, = torch.autograd.grad((layer(cov) * grad_out).sum(), cov)

    evals, evecs = torch.linalg.eigh(cov.detach())
    evals = clamp_eigenvalues(evals, torch.finfo(torch.float64).eps)
    roots = evals.sqrt()
    gap = evals[:, :, None] - evals[:, None, :]
    tied = gap == 0
    loewner = torch.where(tied, torch.zeros_like(gap), (roots[:, :, None] - roots[:, None, :]) / torch.where(tied, 1, gap))
    loewner.diagonal(dim1=-2, dim2=-1).copy_(0.5 / roots)
    sym = 0.5 * (grad_out + grad_out.mT)
    expected = evecs @ ((evecs.mT @ sym @ evecs) * loewner) @ evecs.mT
    assert tied.sum() > 2 * 24  # ties off the diagonal exist
    assert grad.abs().max() > 0
    if method == 'svd_pi':  # 20 terms of the geometric series: close to, not equal to, the closed form
        assert torch.linalg.matrix_norm(grad - expected).max() < 0.5 * torch.linalg.matrix_norm(expected).max()
    else:
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
