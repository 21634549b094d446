"""The meta-layers' input contract, the same for every method: option ranges, non-finite, empty and indefinite
covariances (float64 references from `torch.linalg.eigh`)."""
import re

import pytest
import torch

import timm_gcp
from timm_gcp.layers import GCPPool
from timm_gcp.ops import IndefiniteCovarianceError, NonFiniteCovarianceError

METHODS = timm_gcp.list_meta_layers()
EPS32_ROOT = torch.finfo(torch.float32).eps ** 0.5


def spd(evals, batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    """(batch, d, d) symmetric matrices with the given spectrum and random eigenvectors (built in float64)."""
    evals = torch.as_tensor(evals, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(batch, evals.numel(), evals.numel(), dtype=torch.float64))
    return ((q * evals) @ q.transpose(1, 2)).to(dtype)


# ---------------------------------------------------------------- options

BAD_OPTIONS = [
    ('isqrt', 'num_iter', [0, 101, 10 ** 9, 1e9, 5.0, True, '5', None]),
    ('isqrt', 'compile', [1, 'yes', None]),
    ('mpa_lya', 'lya_iter', [0, 101, 10 ** 9, 8.0, False]),
    ('mtp_lya', 'lya_iter', [0, 101]),
    ('mtp_lya', 'degree', [0, 101, 10 ** 9, 10.0, True]),
    ('svd_taylor', 'degree', [-1, 1001, 10 ** 9, 100.0, True]),
    ('svd_pi', 'num_iter', [0, 1001, 10 ** 9, 20.0, True]),
    ('svd_trunc', 'clip', [0, -1.0, float('inf'), float('nan'), 1e31, True, '1e10']),
    ('eig', 'alpha', [0, -0.5, 2.5, float('nan'), float('inf'), True, '0.5']),
    ('svd_pade', 'alpha', [0, 3]),
    ('eig', 'eps', [-1e-3, 1.5, float('nan'), True]),
    ('svd_taylor', 'eps', [-1.0]),
    ('eig', 'float64', [0, 'no']),
    ('svd_pi', 'float64', [1]),
    ('eig', 'eigh_backend', [3, None, 'magma']),
    ('isice', 'lam', [-0.01, 0, 1e-4, 1.5, float('nan'), float('inf'), True, '0.01']),
    ('isice', 'steps', [0, 101, 10 ** 9, 5.0, True]),
    ('isice', 'lr', [0, -1.0, 100.5, float('inf'), False]),
]


@pytest.mark.parametrize('name, option, values', BAD_OPTIONS, ids=[f'{n}-{o}' for n, o, _ in BAD_OPTIONS])
def test_out_of_range_options_raise_one_clear_error(name, option, values):
    for value in values:
        with pytest.raises(ValueError, match=rf'^{name} option {option} must be .*, got {re.escape(repr(value))}$'):
            timm_gcp.create_meta_layer(name, **{option: value})


@pytest.mark.parametrize('name, kwargs', [
    ('isqrt', {'num_iter': 1}), ('isqrt', {'num_iter': 100}), ('mpa_lya', {'lya_iter': 100}),
    ('mtp_lya', {'degree': 100, 'lya_iter': 1}), ('svd_taylor', {'degree': 0}), ('svd_taylor', {'degree': 1000}),
    ('svd_pi', {'num_iter': 1000}), ('svd_trunc', {'clip': 1e30}), ('eig', {'alpha': 2, 'eps': 0}),
    ('eig', {'alpha': 1e-3, 'eps': 1}), ('isice', {'lam': 1e-3, 'steps': 1, 'lr': 100}),
    ('isice', {'lam': 1, 'steps': 100, 'lr': 1e-6}),
])
def test_range_limits_are_accepted(name, kwargs):
    layer = timm_gcp.create_meta_layer(name, **kwargs)
    for option, value in kwargs.items():
        assert getattr(layer, option) == value


def test_a_config_with_a_huge_iteration_count_fails_at_construction():
    # what a downloaded config.json could hold: refused before any forward could hang
    with pytest.raises(ValueError, match=r'isqrt option num_iter must be an int from 1 to 100, got 1000000000'):
        GCPPool(16, 8, meta_layer='isqrt', meta_layer_kwargs={'num_iter': 1_000_000_000})
    for bad in (True, 8.0, 0):
        with pytest.raises(ValueError, match=r'GCPPool dim must be a positive int'):
            GCPPool(16, bad)
    with pytest.raises(ValueError, match=r'GCPPool in_chs must be a positive int'):
        GCPPool(None, 8)


# ---------------------------------------------------------------- non-finite

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
@pytest.mark.parametrize('method', METHODS)
def test_non_finite_covariance_raises_one_clear_error(method, bad):
    cov = spd(torch.linspace(0.5, 1.0, 6), batch=3, dtype=torch.float32)
    cov[1, 2, 4] = bad
    layer = timm_gcp.create_meta_layer(method)
    with pytest.raises(NonFiniteCovarianceError,
                       match=rf'^{method} input covariance is non-finite \(NaN or Inf in 1 of 3 matrices, batch '
                             rf'elements \[1\]\)$'):
        layer(cov)
    with pytest.raises(ValueError, match='non-finite'):  # also under autocast and for float64 input
        with torch.autocast('cpu', dtype=torch.bfloat16):
            layer(cov.bfloat16())
    with pytest.raises(ValueError, match='non-finite'):
        layer(cov.double())


@pytest.mark.parametrize('method', METHODS)
def test_non_finite_features_in_a_gcp_head_name_the_head(method):
    head = GCPPool(16, dim=8, meta_layer=method).eval()  # (in training BN spreads NaN to the batch)
    x = torch.randn(2, 16, 5, 5)
    x[0, 3, 1, 1] = float('nan')
    with pytest.raises(NonFiniteCovarianceError,
                       match=r'GCPPool: the covariance of its \(B, 8, H, W\) reduced '
                             r'features is non-finite.*backbone output.*batch elements \[0\]'):
        head(x)
    with pytest.raises(NonFiniteCovarianceError, match='GCPPool'):  # finite features whose covariance overflows
        head.conv.weight.data.fill_(1e30)
        head(torch.ones(2, 16, 5, 5) + torch.arange(25.).view(1, 1, 5, 5))


# ---------------------------------------------------------------- empty batches

@pytest.mark.parametrize('shape', [(0, 5, 5), (3, 0, 0), (0, 0, 0)])
@pytest.mark.parametrize('method', METHODS)
def test_empty_batch_gives_empty_output(method, shape):
    cov = torch.zeros(shape, requires_grad=True)
    out = timm_gcp.create_meta_layer(method)(cov)
    assert out.shape == shape and out.dtype == torch.float32
    out.sum().backward()
    assert cov.grad.shape == shape


@pytest.mark.parametrize('method', METHODS)
def test_empty_feature_batch_through_the_head(method):
    pool = GCPPool(16, 4, meta_layer=method).eval()
    assert pool(torch.randn(0, 16, 3, 3)).shape == (0, 10)
    assert timm_gcp.triu_vec(torch.zeros(2, 0, 0)).shape == (2, 0)


# ---------------------------------------------------------------- indefinite

INDEFINITE = {
    'negative_definite': [-1.0, -0.5, -0.25, -0.1],
    'negative_semidefinite': [-1.0, 0.0, 0.0, 0.0],
    'indefinite': [1.0, 0.5, 0.25, -0.1],
    'one_negative_among_many': [1.0] * 15 + [-0.05],
}


@pytest.mark.parametrize('case', list(INDEFINITE))
@pytest.mark.parametrize('method', METHODS)
def test_indefinite_covariance_raises_for_every_method(method, case):
    cov = spd(INDEFINITE[case])
    cov[0] = spd(torch.linspace(0.5, 1.0, cov.shape[-1]), batch=1)[0]  # only batch element 1 is bad
    reference_evals = torch.linalg.eigvalsh(cov)
    assert reference_evals[1, 0] < -EPS32_ROOT * reference_evals[1].sum().abs()  # beyond the tolerance
    layer = timm_gcp.create_meta_layer(method)
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(IndefiniteCovarianceError,
                           match=rf'^{method} input covariance is not positive semi-definite.*batch elements \[1\]'):
            layer(cov.to(dtype))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('method', METHODS)
def test_psd_tolerance_is_sqrt_eps_of_the_trace(method, dtype):
    """An eigenvalue of -0.1·√eps·tr passes as rounding, one of -10·√eps·tr raises (eps of the input's dtype)."""
    root_eps = torch.finfo(dtype).eps ** 0.5
    layer = timm_gcp.create_meta_layer(method)
    evals = torch.linspace(0.5, 1.0, 8, dtype=torch.float64)
    for factor, raises in ((0.1, False), (10.0, True)):
        spectrum = torch.cat([evals, -factor * root_eps * evals.sum()[None]])
        cov = spd(spectrum, dtype=dtype)
        if raises:
            with pytest.raises(IndefiniteCovarianceError):
                layer(cov)
        else:
            assert torch.isfinite(layer(cov)).all()


@pytest.mark.parametrize('method', METHODS)
def test_rank_deficient_covariances_from_features_pass(method):
    """The covariance of fewer positions than channels is singular; its rounding errors are far inside the
    tolerance: the check never rejects a real covariance."""
    for scale in (1e-6, 1.0, 1e6):
        features = torch.randn(4, 64, 9) * scale
        assert torch.isfinite(timm_gcp.create_meta_layer(method)(timm_gcp.covariance(features))).all()
    rank_one = torch.randn(2, 32, 1) * torch.randn(2, 1, 49)
    assert torch.isfinite(timm_gcp.create_meta_layer(method)(timm_gcp.covariance(rank_one))).all()


def test_exact_layers_match_the_psd_projection_within_the_tolerance():
    """Inside the tolerance the exact layers clamp: the result is the root of the PSD projection (float64 ref)."""
    spectrum = torch.tensor([1.0, 0.5, 0.25, -1e-9])  # tolerance in float64: 1.5e-8 * 1.75
    cov = spd(spectrum)
    evals, evecs = torch.linalg.eigh(cov)
    reference = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.transpose(1, 2)
    for method in ('eig', 'svd_pade', 'svd_taylor', 'svd_pi', 'svd_trunc'):
        out = timm_gcp.create_meta_layer(method, eps=0.0)(cov)
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
