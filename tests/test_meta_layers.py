"""Meta-layers against independent float64 references: forward accuracy, gradcheck, gradient agreement."""
import math
from fractions import Fraction

import pytest
import torch
from torch.autograd import gradcheck

import timm_gcp
from timm_gcp.layers import AdaptiveChannelDropout
from timm_gcp.meta_layers import solve_lyapunov
from timm_gcp.meta_layers.lyapunov import MPA_DENOMINATOR, MPA_NUMERATOR, sqrt_taylor_coefficients
from timm_gcp.meta_layers.spectral import (
    SvdPade, geometric_partial_sum, loewner_power, pade_geometric_coefficients, polyval, published_pade_coefficients,
    replace_non_finite,
)

from reference_isqrt import reference_newton_schulz_sqrt

ALL_METHODS = ['cov', 'eig', 'isice', 'isqrt', 'mpa_lya', 'mtp_lya', 'svd_pade', 'svd_pi', 'svd_taylor', 'svd_trunc']
EXACT_METHODS = ['eig', 'svd_pade', 'svd_pi', 'svd_taylor', 'svd_trunc']


def spd(evals: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """float64 (batch, d, d) symmetric matrices with the given spectrum and random eigenvectors."""
    q, _ = torch.linalg.qr(torch.randn(batch, evals.numel(), evals.numel(), dtype=torch.float64))
    return (q * evals.to(torch.float64)) @ q.transpose(1, 2)


def reference_power(cov: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov.double())
    return (evecs * evals.clamp_min(0).pow(alpha).unsqueeze(-2)) @ evecs.transpose(1, 2)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def geometric_spectrum(d: int, ratio: float = 0.5) -> torch.Tensor:
    return ratio ** torch.arange(d, dtype=torch.float64)


# ---------------------------------------------------------------- registry and bad input

def test_every_method_is_registered():
    names = timm_gcp.list_meta_layers()
    assert set(ALL_METHODS) <= set(names) and names == sorted(names)


def test_a_registered_meta_layer_is_created_by_name():
    @timm_gcp.register_meta_layer('test_doubled_cov')
    class Doubled(timm_gcp.MetaLayer):
        def normalize(self, cov):
            return 2 * cov

    cov = timm_gcp.covariance(torch.randn(2, 4, 10))
    assert 'test_doubled_cov' in timm_gcp.list_meta_layers()
    torch.testing.assert_close(timm_gcp.create_meta_layer('test_doubled_cov')(cov), 2 * cov)
    with pytest.raises(ValueError, match="'test_doubled_cov' is already registered"):
        timm_gcp.register_meta_layer('test_doubled_cov')(Doubled)


def test_no_meta_layer_leaks_from_another_test():
    assert 'test_doubled_cov' not in timm_gcp.list_meta_layers()  # registered above, forgotten by conftest


def test_unknown_name_lists_every_known_name():
    with pytest.raises(ValueError) as err:
        timm_gcp.create_meta_layer('svd_magic')
    for name in ALL_METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize('name', ALL_METHODS)
@pytest.mark.parametrize('shape', [(4, 4), (2, 3, 4), (2, 4, 4, 4)])
def test_wrong_rank_or_non_square_input_names_expected_shape(name, shape):
    with pytest.raises(ValueError, match=r'\(B, d, d\)'):
        timm_gcp.create_meta_layer(name)(torch.randn(shape))


@pytest.mark.parametrize('name, kwargs', [
    ('eig', {'alpha': 0}), ('eig', {'eps': -1.0}), ('svd_taylor', {'degree': -1}), ('svd_pi', {'num_iter': 0}),
    ('svd_trunc', {'clip': 0}), ('mpa_lya', {'lya_iter': 0}), ('mtp_lya', {'degree': 0}), ('isqrt', {'num_iter': 0}),
    ('isice', {'lam': -0.01}), ('isice', {'steps': 1000}),
])
def test_bad_options_are_rejected(name, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        timm_gcp.create_meta_layer(name, **kwargs)


# ---------------------------------------------------------------- forward accuracy

# max |out - ref| / max |ref| against float64 torch.linalg.eigh, for float32 input
EXACT_FORWARD_TOL = {'eig': 2e-6, 'svd_pade': 2e-7, 'svd_pi': 2e-7, 'svd_taylor': 2e-7, 'svd_trunc': 2e-7}


@pytest.mark.parametrize('name', EXACT_METHODS)
def test_exact_forward_matches_float64_eigh(name):
    cov = spd(torch.linspace(0.1, 2.0, 32)).float()
    out = timm_gcp.create_meta_layer(name)(cov)
    assert out.dtype == torch.float32
    assert relative_error(out, reference_power(cov)) < EXACT_FORWARD_TOL[name]


@pytest.mark.parametrize('name', EXACT_METHODS)
def test_exact_forward_rank_deficient_256(name):
    # M = 196 positions < d = 256: 61 zero eigenvalues; float32 rounding noise of size eps·λ_max under the square
    # root is what bounds the error of an exact method here
    cov = timm_gcp.covariance(torch.randn(1, 256, 196))
    out = timm_gcp.create_meta_layer(name)(cov)
    assert relative_error(out, reference_power(cov)) < (1e-3 if name == 'eig' else 1e-6)


@pytest.mark.parametrize('name', EXACT_METHODS)
def test_exact_forward_float64_in_float64_out(name):
    cov = spd(torch.linspace(0.1, 2.0, 16))
    out = timm_gcp.create_meta_layer(name)(cov)
    assert out.dtype == torch.float64
    assert relative_error(out, reference_power(cov)) < 1e-13


@pytest.mark.parametrize('alpha', [0.25, 0.5, 1.0, 1.5])
def test_eig_matrix_power(alpha):
    cov = spd(torch.linspace(0.05, 3.0, 12))
    out = timm_gcp.create_meta_layer('eig', alpha=alpha)(cov)
    assert relative_error(out, reference_power(cov, alpha)) < 1e-13


def test_eigenvalue_clamp_is_relative_to_largest():
    cov = torch.diag_embed(torch.tensor([[1e6, 1e-9, -1e-3]], dtype=torch.float64))
    out = timm_gcp.create_meta_layer('eig', eps=1e-10)(cov)
    torch.testing.assert_close(out.diagonal(dim1=1, dim2=2), torch.tensor([[1e3, 1e-2, 1e-2]], dtype=torch.float64))


# max |out - ref| / max |ref| against the exact root on a spectrum in [0.5, 1] (d = 16)
APPROXIMATE_FORWARD_TOL = {'mpa_lya': 2e-4, 'mtp_lya': 1e-2, 'isqrt': 5e-2}


@pytest.mark.parametrize('name', list(APPROXIMATE_FORWARD_TOL))
def test_approximate_forward_accuracy(name):
    cov = spd(torch.linspace(0.5, 1.0, 16))
    out = timm_gcp.create_meta_layer(name)(cov)
    assert relative_error(out, reference_power(cov)) < APPROXIMATE_FORWARD_TOL[name]


def test_mtp_converges_with_degree():
    cov = spd(torch.linspace(0.5, 1.0, 16))
    errors = [relative_error(timm_gcp.create_meta_layer('mtp_lya', degree=k)(cov), reference_power(cov))
              for k in (2, 5, 10, 40)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


def test_mpa_coefficients_are_the_5_5_pade_of_sqrt_1_minus_z():
    # Taylor coefficients of √(1 − z) in exact arithmetic, then the Padé conditions Q·T − P = O(z^11) with q0 = 1
    taylor = [Fraction(1)]
    for k in range(1, 11):
        taylor.append(taylor[-1] * (Fraction(k) - Fraction(3, 2)) / k)
    p = [Fraction(c) for c in MPA_NUMERATOR]
    q = [Fraction(c) for c in MPA_DENOMINATOR]
    product = [sum(q[j] * taylor[k - j] for j in range(min(k, 5) + 1)) for k in range(11)]
    assert product[:6] == p and all(c == 0 for c in product[6:])
    assert [float(c) for c in taylor] == sqrt_taylor_coefficients(10)


@pytest.mark.parametrize('num_iter', [1, 2, 5])
def test_isqrt_matches_independent_newton_schulz(num_iter):
    cov = spd(torch.linspace(0.01, 1.0, 24), batch=3)
    expected = reference_newton_schulz_sqrt(cov, num_iter)
    out = timm_gcp.create_meta_layer('isqrt', num_iter=num_iter)(cov)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)
    out32 = timm_gcp.create_meta_layer('isqrt', num_iter=num_iter)(cov.float())
    assert relative_error(out32, expected) < 1e-5


def test_isqrt_converges_to_exact_root():
    cov = spd(torch.linspace(0.2, 1.0, 8))
    errors = [relative_error(timm_gcp.create_meta_layer('isqrt', num_iter=n)(cov), reference_power(cov))
              for n in (1, 2, 3, 5, 8, 12)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12


# ---------------------------------------------------------------- gradients

# (options, spectrum, gradcheck atol): eigenvector-rule K approximations are exact up to x^n with x = λ_j/λ_i, so
# they are checked on a geometric spectrum (x ≤ ½); the approximate forwards differ from the exact root by their
# truncation error, which bounds how far their (exact-root) Lyapunov gradient can match the finite differences
GRADCHECK_CASES = {
    'eig': ({}, 'clustered', 1e-8), 'eig-alpha0.3': ({'alpha': 0.3}, 'clustered', 1e-8),
    'svd_trunc': ({}, 'clustered', 1e-8), 'svd_pade': ({}, 'geometric', 1e-8),
    'svd_taylor': ({}, 'geometric', 1e-8), 'svd_pi': ({}, 'geometric', 1e-5),
    'mpa_lya': ({}, 'clustered', 1e-4), 'mtp_lya': ({}, 'clustered', 1e-2),
    'mtp_lya-degree40': ({'degree': 40, 'lya_iter': 12}, 'clustered', 1e-6),
    'isqrt': ({}, 'clustered', 1e-8), 'isqrt-1iter': ({'num_iter': 1}, 'clustered', 1e-8),
    'cov': ({}, 'clustered', 1e-8),
}


@pytest.mark.parametrize('case', list(GRADCHECK_CASES))
def test_gradcheck_float64(case):
    kwargs, spectrum, atol = GRADCHECK_CASES[case]
    evals = geometric_spectrum(8) if spectrum == 'geometric' else torch.linspace(1.0, 2.0, 8)
    layer = timm_gcp.create_meta_layer(case.split('-')[0], **kwargs)
    cov = spd(evals, batch=1).requires_grad_()
    assert gradcheck(layer, (cov,), atol=atol, rtol=1e-3)


def autograd_eigh_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Independent exact reference: torch's own eigh backward."""
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
    return (evecs * evals.sqrt().unsqueeze(-2)) @ evecs.transpose(1, 2)


def gradient(fn, cov: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    cov = cov.detach().clone().requires_grad_()
    (fn(cov) * upstream).sum().backward()
    return cov.grad


# max relative deviation from torch's eigh autograd (float64, d = 32, spectrum 0.7^k): K approximations of order n
# are off by about x^n near the largest ratio x = 0.7
GRADIENT_AGREEMENT_TOL = {'eig': 1e-11, 'svd_trunc': 1e-11, 'svd_pade': 1e-11, 'svd_taylor': 1e-11, 'svd_pi': 2e-3}


@pytest.mark.parametrize('name', EXACT_METHODS)
def test_exact_gradients_agree(name):
    cov = spd(geometric_spectrum(32, 0.7))
    upstream = torch.randn_like(cov)
    reference = gradient(autograd_eigh_sqrt, cov, upstream)
    grad = gradient(timm_gcp.create_meta_layer(name), cov, upstream)
    assert relative_error(grad, reference) < GRADIENT_AGREEMENT_TOL[name]


# d = 32, spectrum evenly spaced in [0.3, 1]: neighbouring ratios λ_j/λ_i reach 0.98, where the K series are
# inexact by design (SVD-PI furthest); the published SVD-Padé approximant is 1/(1 - x) in floating point
FLOAT32_GRADIENT_TOL = {'eig': 1e-5, 'svd_trunc': 1e-5, 'svd_pade': 1e-5, 'svd_taylor': 5e-2, 'svd_pi': 3e-1}


@pytest.mark.parametrize('name', EXACT_METHODS)
def test_exact_gradients_agree_float32(name):
    cov = spd(torch.linspace(0.3, 1.0, 32))
    upstream = torch.randn_like(cov)
    reference = gradient(timm_gcp.create_meta_layer('eig'), cov, upstream)
    grad = gradient(timm_gcp.create_meta_layer(name, alpha=0.5), cov.float(), upstream.float())
    assert grad.dtype == torch.float32
    assert relative_error(grad, reference) < FLOAT32_GRADIENT_TOL[name]


@pytest.mark.parametrize('name', ['mpa_lya', 'mtp_lya'])
def test_lyapunov_backward_approximates_exact(name):
    cov = spd(torch.linspace(0.5, 1.0, 16))
    upstream = torch.randn_like(cov)
    reference = gradient(timm_gcp.create_meta_layer('eig'), cov, upstream)
    grad = gradient(timm_gcp.create_meta_layer(name), cov, upstream)
    assert relative_error(grad, reference) < (2e-4 if name == 'mpa_lya' else 1e-2)


def test_solve_lyapunov_residual():
    y = spd(torch.linspace(0.3, 1.0, 16))
    g = torch.randn_like(y)
    g = g + g.transpose(1, 2)
    errors = []
    for num_iter in (2, 4, 8):
        x = solve_lyapunov(y, g, num_iter)
        errors.append(relative_error(y @ x + x @ y, g))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 3e-4


def test_loewner_half_power_is_inverse_root_sum():
    evals = torch.tensor([[1e-6, 0.3, 0.3, 2.0, 5e3]], dtype=torch.float64)
    roots = evals.sqrt()
    expected = 1.0 / (roots.unsqueeze(-1) + roots.unsqueeze(-2))
    torch.testing.assert_close(loewner_power(evals, 0.5), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize('alpha', [0.3, 1.7])
def test_loewner_general_power_handles_near_ties(alpha):
    lam = torch.tensor([[1.0, 1.0 + 1e-13, 1.0 + 1e-7, 4.0]], dtype=torch.float64)
    out = loewner_power(lam, alpha)
    assert torch.isfinite(out).all()
    # near ties the divided difference tends to the derivative α λ^(α−1)
    torch.testing.assert_close(out[0, 0, 1], torch.tensor(alpha, dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(out[0, 0, 2], torch.tensor(alpha, dtype=torch.float64), rtol=1e-6, atol=0)
    divided_difference = torch.tensor((4.0 ** alpha - 1) / 3, dtype=torch.float64)
    torch.testing.assert_close(out[0, 0, 3], divided_difference, rtol=1e-13, atol=0)


def test_pade_type_approximant_of_geometric_series():
    numerator, denominator = pade_geometric_coefficients(50)
    assert len(numerator) == len(denominator) == 51  # a [50/50] rational
    # exact identity Q − (1 − x)·P = x^51: matches 1/(1 − x) through x^50 with the error x^51/((1 − x)Q)
    one_minus_x_times_p = [numerator[0]] + [numerator[k] - numerator[k - 1] for k in range(1, 51)] + [-numerator[50]]
    residual = [q - r for q, r in zip(denominator + [0.0], one_minus_x_times_p)]
    assert residual == [0.0] * 51 + [1.0]
    x = torch.linspace(0, 1, 10001, dtype=torch.float64)
    approx = SvdPade(approximant='bounded').geometric(x)
    exact = 1 / (1 - x[x <= 0.9])
    assert ((approx[x <= 0.9] - exact).abs() / exact).max() < 2e-4   # close to K away from ties
    assert (approx[1:] >= approx[:-1]).all() and approx[-1] == 1326  # increasing, bounded at ties
    assert polyval(denominator, x).min() >= 1  # no poles on [0, 1]
    taylor_at_999 = polyval([1.0] * 101, torch.tensor(0.999, dtype=torch.float64))
    assert abs(SvdPade(approximant='bounded').geometric(torch.tensor(0.999, dtype=torch.float64)) - 1000) < \
        abs(taylor_at_999 - 1000)


def test_published_pade_approximant_is_the_geometric_series():
    numerator, denominator = published_pade_coefficients(50)
    assert len(numerator) == len(denominator) == 51 and denominator[0] == 1.0  # a [50/50] rational, q_0 = 1
    assert numerator != [1.0] + [0.0] * 50  # not 1/(1 - x) written down: the release's 20-digit Padé solve
    x = torch.linspace(0, 0.999, 5001, dtype=torch.float64)
    approx = SvdPade().geometric(x)
    assert ((approx - 1 / (1 - x)).abs() * (1 - x)).max() < 1e-9   # 1/(1 - x) in floating point
    assert not torch.isfinite(SvdPade().geometric(torch.ones((), dtype=torch.float64)))  # ties: the guard acts
    with pytest.raises(ValueError, match="approximant must be one of \\['bounded', 'published'\\]"):
        SvdPade(approximant='taylor')


@pytest.mark.parametrize('approximant', ['published', 'bounded'])
def test_svd_pade_finite_gradient_at_repeated_eigenvalues(approximant):
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    cov = (basis * torch.tensor([1., 1., 1., 0.5, 0.5, 2.], dtype=torch.float64)) @ basis.T
    cov = cov[None].requires_grad_()
    timm_gcp.create_meta_layer('svd_pade', approximant=approximant)(cov).square().sum().backward()
    assert torch.isfinite(cov.grad).all()


@pytest.mark.parametrize('num_terms', [1, 2, 3, 20, 101])
def test_geometric_partial_sum(num_terms):
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    expected = sum(x ** k for k in range(num_terms))
    torch.testing.assert_close(geometric_partial_sum(x, num_terms), expected, rtol=1e-13, atol=0)


def test_svd_trunc_clips_k():
    layer = timm_gcp.create_meta_layer('svd_trunc', clip=1e4)
    evals = torch.tensor([[1.0, 1.0 + 1e-8, 4.0]], dtype=torch.float64)
    loewner = layer.loewner(evals, evals.sqrt(), 0.5)
    clipped = torch.tensor((1 - (1 + 1e-8) ** 0.5) * -1e4, dtype=torch.float64)  # (√λ_0 − √λ_1)·(−clip)
    torch.testing.assert_close(loewner[0, 0, 1], clipped)
    torch.testing.assert_close(loewner[0, 0, 2], torch.tensor(1 / 3.0, dtype=torch.float64))


def test_overflow_guard_replaces_non_finite_entries():
    grad = torch.tensor([[[1.0, float('nan')], [float('inf'), -float('inf')]], [[2.0, -3.0], [0.5, 1.0]]])
    out = replace_non_finite(grad)
    assert out.tolist() == [[[1.0, 0.0], [1.0, -1.0]], [[2.0, -3.0], [0.5, 1.0]]]


@pytest.mark.parametrize('name', EXACT_METHODS)
def test_eigendecomposition_goes_through_the_chosen_backend(name, monkeypatch):
    calls = []

    def counting_eigh(a):
        calls.append(a.dtype)
        return original(a)

    original = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, 'eigh', counting_eigh)
    cov = spd(torch.linspace(0.5, 1.0, 8)).float()
    timm_gcp.create_meta_layer(name, eigh_backend='torch')(cov)
    assert calls == [torch.float32 if name == 'eig' else torch.float64]  # svd_* default to float64 as published
    with pytest.raises(ValueError, match='needs a CUDA tensor'):
        timm_gcp.create_meta_layer(name, eigh_backend='cusolver')(cov)
    with pytest.raises(ValueError, match=f"^{name} option eigh_backend must be one of 'auto', 'torch', 'cusolver'"):
        timm_gcp.create_meta_layer(name, eigh_backend='nonexistent')


# ---------------------------------------------------------------- DropCov

def test_cov_layer_is_identity_in_float32():
    cov = timm_gcp.covariance(torch.randn(2, 8, 20))
    assert torch.equal(timm_gcp.create_meta_layer('cov')(cov), cov)
    assert timm_gcp.create_meta_layer('cov')(cov.to(torch.bfloat16)).dtype == torch.float32


def reference_reweighted_and_rate(layer: AdaptiveChannelDropout, x: torch.Tensor):
    """The paper's steps in float64 with the layer's attention kernel: softmax(conv1d(GAP(x))) = w, x' = x·(1 + w),
    p = clamp(1 − (scale/log2 C)·mean_b cos(w_b, row sums of the explicit C x C covariance of x'_b), 0, 1)."""
    flat = x.double().flatten(2)
    kernel = layer.attention.weight.double()
    weights = torch.nn.functional.conv1d(flat.mean(-1)[:, None], kernel, padding=kernel.shape[-1] // 2)[:, 0]
    weights = weights.softmax(dim=-1)
    reweighted = flat * (1 + weights[..., None])
    row_sums = torch.stack([torch.cov(sample, correction=0).sum(-1) for sample in reweighted])
    agreement = torch.nn.functional.cosine_similarity(weights, row_sums, dim=1).mean()
    return reweighted, (1 - layer.scale / math.log2(x.shape[1]) * agreement).clamp(0, 1)


def test_adaptive_channel_dropout_rate_and_mask():
    layer = AdaptiveChannelDropout(scale=2.0).train()
    x = torch.randn(4, 64, 7, 7).abs()
    reweighted, p = reference_reweighted_and_rate(layer, x)
    assert 0 < p < 1
    out = layer(x).flatten(2).double()
    dropped = (out == 0).all(dim=-1)
    kept = ~dropped
    # every channel is dropped whole or kept and rescaled by 1/(1 - p)
    torch.testing.assert_close(out[kept], reweighted[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    assert 0 < dropped.double().mean() < 1


def test_adaptive_channel_dropout_eval_identity_and_gradients():
    layer = AdaptiveChannelDropout()
    x = torch.randn(2, 16, 5, 5)
    assert layer.eval()(x) is x
    layer.train()
    layer(x).sum().backward()
    assert layer.attention.weight.grad is not None and torch.isfinite(layer.attention.weight.grad).all()
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        layer(torch.randn(2, 16))


@pytest.mark.parametrize('name', ['mpa_lya', 'mtp_lya'])
def test_lyapunov_layers_survive_huge_covariances(name):
    cov = (spd(torch.linspace(0.5, 1.0, 8)) * 1e30).float().requires_grad_()  # squared entries overflow float32
    out = timm_gcp.create_meta_layer(name)(cov)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cov.grad).all()
    torch.testing.assert_close(out / 1e15, timm_gcp.create_meta_layer(name)(cov.detach() / 1e30), rtol=1e-4, atol=0)
