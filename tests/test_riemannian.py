"""RiemGCP's maps (`riemannian=` of GCPPool and every GCP model) against float64 eigendecomposition and Cholesky
references computed with NumPy, gradcheck, the positive-definiteness rule of 'chol_tmlr' and the θ of each
meta-layer."""
import numpy as np
import pytest
import timm
import torch
from torch.autograd import gradcheck

import timm_gcp
from timm_gcp.layers import RIEMANNIAN_MAPS, GCPPool, RiemannianMap
from timm_gcp.ops import IndefiniteCovarianceError

MAPS_WITH_POWER = [name for name in RIEMANNIAN_MAPS if name != 'pow_emlr']


def spd(evals, batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    """(batch, d, d) symmetric matrices with the given spectrum and random eigenvectors (built in float64)."""
    evals = torch.as_tensor(evals, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(batch, evals.numel(), evals.numel(), dtype=torch.float64))
    return ((q * evals) @ q.transpose(1, 2)).to(dtype)


def numpy_function(m: torch.Tensor, fn) -> torch.Tensor:
    """V diag(fn(λ)) Vᵀ by NumPy's float64 eigendecomposition."""
    evals, evecs = np.linalg.eigh(m.double().numpy())
    return torch.from_numpy((evecs * fn(evals)[..., None, :]) @ np.swapaxes(evecs, -1, -2))


def numpy_log_cholesky(m: torch.Tensor) -> torch.Tensor:
    """T + Tᵀ, T = strict_lower(L) + diag(log diag L), L = NumPy's Cholesky factor of M + √eps·tr M·I (float64)."""
    m = m.double().numpy()
    shift = np.finfo(np.float64).eps ** 0.5 * np.trace(m, axis1=-2, axis2=-1)
    factor = np.linalg.cholesky(m + shift[:, None, None] * np.eye(m.shape[-1]))
    lower = np.tril(factor, -1) + np.einsum('bi,ij->bij', np.log(np.diagonal(factor, axis1=-2, axis2=-1)),
                                            np.eye(m.shape[-1]))
    return torch.from_numpy(lower + np.swapaxes(lower, -1, -2))


def reference(name: str, cov: torch.Tensor, theta: float) -> torch.Tensor:
    """The classifier's input for Σ = `cov` under `name`, from Σ^θ (float64, NumPy)."""
    powered = numpy_function(cov, lambda evals: evals ** theta)
    eye = torch.eye(cov.shape[-1], dtype=torch.float64)
    return {
        'pow_emlr': powered,
        'scalepow_emlr': powered / theta,
        'pow_tmlr': (powered - eye) / theta,
        'chol_tmlr': numpy_log_cholesky(powered) / theta,
        'log_emlr': numpy_function(cov, np.log),  # log Σ itself: log(Σ^θ)/θ
    }[name]


@pytest.mark.parametrize('theta', [0.5, 0.3, 1.0])
@pytest.mark.parametrize('name', RIEMANNIAN_MAPS)
def test_each_map_matches_its_float64_reference(name, theta):
    cov = spd(torch.linspace(0.05, 2.0, 12))
    powered = numpy_function(cov, lambda evals: evals ** theta)
    out = RiemannianMap(name)(powered, theta)
    torch.testing.assert_close(out, reference(name, cov, theta), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('name', RIEMANNIAN_MAPS)
def test_theta_comes_from_the_meta_layer(name):
    """Through GCPPool (no reduction): eig with alpha=0.3 in float64 gives the reference for θ = 0.3."""
    features = torch.randn(2, 10, 49, dtype=torch.float64)
    pool = GCPPool(10, dim=None, meta_layer='eig', meta_layer_kwargs={'alpha': 0.3}, riemannian=name).double()
    expected = timm_gcp.triu_vec(reference(name, timm_gcp.covariance(features), 0.3))
    torch.testing.assert_close(pool(features[..., None]), expected, rtol=1e-8, atol=1e-9)


def test_isqrt_and_cov_powers():
    """isqrt is Σ^½ (θ = ½: ScalePow-EMLR doubles it), cov is Σ^1 (Pow-TMLR is Σ − I)."""
    features = torch.randn(2, 12, 6, 6)
    plain = GCPPool(12, dim=None)
    torch.testing.assert_close(GCPPool(12, dim=None, riemannian='scalepow_emlr')(features), 2 * plain(features))
    cov = timm_gcp.covariance(features)
    tangent = GCPPool(12, dim=None, meta_layer='cov', riemannian='pow_tmlr')(features)
    torch.testing.assert_close(tangent, timm_gcp.triu_vec(cov - torch.eye(12)))


@pytest.mark.parametrize('name', MAPS_WITH_POWER)
def test_gradcheck(name):
    m = spd(torch.linspace(0.2, 1.5, 5)).requires_grad_()
    assert gradcheck(lambda x: RiemannianMap(name)(x, 0.5), (m,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_log_map_gradient_at_repeated_eigenvalues():
    """The Daleckii–Krein backward needs no distinct eigenvalues: ties (repeated and all-equal spectra) pass gradcheck
    where autograd through `torch.linalg.eigh` divides by λ_i − λ_j = 0."""
    for spectrum in ([0.5, 0.5, 0.5, 2.0, 2.0], [1.3] * 5):
        m = spd(torch.tensor(spectrum)).requires_grad_()
        assert gradcheck(lambda x: RiemannianMap('log_emlr')(x, 1.0), (m,), eps=1e-6, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------- Chol-TMLR: positive definiteness

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_chol_tmlr_psd_tolerance_is_the_input_contract(dtype):
    """An eigenvalue of −0.1·√eps·tr passes (shifted by √eps·tr, finite), one of −10·√eps·tr raises one clear error
    naming the batch element (eps of the dtype), never NaN."""
    root_eps = torch.finfo(dtype).eps ** 0.5
    evals = torch.linspace(0.5, 1.0, 8, dtype=torch.float64)
    chol = RiemannianMap('chol_tmlr')
    inside = spd(torch.cat([evals, -0.1 * root_eps * evals.sum()[None]]), dtype=dtype)
    assert torch.isfinite(chol(inside, 1.0)).all()
    outside = spd(torch.cat([evals, -10 * root_eps * evals.sum()[None]]), batch=3, dtype=dtype)
    outside[0] = spd(torch.cat([evals, evals[:1]]), batch=1, dtype=dtype)[0]
    expected = (r'^riemannian chol_tmlr input \(the meta-layer output\) is not positive semi-definite.*'
                r'2 of 3 matrices, batch elements \[1, 2\]')
    with pytest.raises(IndefiniteCovarianceError, match=expected):
        chol(outside, 1.0)


def test_chol_tmlr_on_singular_covariances_is_finite():
    """M < d positions: Σ is singular, its Cholesky factor exists only with the √eps·tr shift (as published, a shift
    keeps rank-deficient covariances usable)."""
    features = torch.randn(2, 16, 3, 3, requires_grad=True)  # 9 positions < 16 channels
    out = GCPPool(16, dim=None, meta_layer='cov', riemannian='chol_tmlr')(features)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(features.grad).all()


# ---------------------------------------------------------------- options and the θ check

@pytest.mark.parametrize('name', MAPS_WITH_POWER)
def test_a_map_needing_theta_refuses_a_meta_layer_without_one(name):
    with pytest.raises(ValueError, match=rf"riemannian='{name}' maps Σ\^θ with the meta-layer's θ, and meta-layer "
                                         r"'isice' computes no matrix power"):
        GCPPool(16, 8, meta_layer='isice', riemannian=name)
    pool = GCPPool(16, 8, riemannian=name)
    with pytest.raises(ValueError, match='computes no matrix power'):
        pool.set_meta_layer('isice')
    assert pool.meta_layer_name == 'isqrt' and pool.meta_layer.power == 0.5  # a failed switch changes nothing
    with pytest.raises(ValueError, match='computes no matrix power'):
        timm.create_model('gcp_resnet18', gcp_dim=8, meta_layer='isice', riemannian=name)


def test_isice_takes_the_classic_head():
    pool = GCPPool(16, 8, meta_layer='isice', riemannian='pow_emlr')
    assert torch.isfinite(pool(torch.randn(2, 16, 4, 4))).all()


@pytest.mark.parametrize('bad', ['log', 'Pow_EMLR', '', None, 3])
def test_unknown_map_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=r'^riemannian must be one of pow_emlr, scalepow_emlr, pow_tmlr, chol_tmlr, '
                                         rf'log_emlr, got {bad!r}$'):
        GCPPool(16, 8, riemannian=bad)


# ---------------------------------------------------------------- the head

def test_default_head_is_unchanged():
    """'pow_emlr' hands the meta-layer's output itself to the triu vector, cites nothing new and adds no state."""
    pool = GCPPool(16, 8).eval()
    assert pool.riemannian == 'pow_emlr' and pool.riemannian_map.papers == ()
    features = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        expected = timm_gcp.triu_vec(pool.meta_layer(timm_gcp.covariance(pool.reduce(features))))
        assert torch.equal(pool(features), expected)
    assert all(not k.startswith('riemannian_map') for k in pool.state_dict())


@pytest.mark.parametrize('name', MAPS_WITH_POWER)
def test_maps_under_autocast_stay_float32(name):
    """Under bf16 autocast the head computes what it computes in float32 on the same (rounded) features, and the map's
    backward called inside an autocast region what it computes outside."""
    features = torch.randn(2, 16, 5, 5).bfloat16()
    pool = GCPPool(16, dim=None, riemannian=name)  # no reduction: the covariance is the same in both runs
    outs, grads = [], []
    for autocast in (True, False):
        leaf = (features if autocast else features.float()).clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = pool(leaf)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append(leaf.grad)
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1].bfloat16(), rtol=0, atol=0)
    root = timm_gcp.create_meta_layer('isqrt')(timm_gcp.covariance(features.float()))
    map_grads = []
    for inside in (True, False):
        leaf = root.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = pool.riemannian_map(leaf, 0.5)
            if inside:
                out.backward(torch.ones_like(out))
        if not inside:
            out.backward(torch.ones_like(out))
        map_grads.append(leaf.grad)
    torch.testing.assert_close(map_grads[0], map_grads[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('arch, kwargs', [
    ('gcp_resnet18', {}), ('gsop_resnet50', {'gsop_net': 2}), ('gcp_test_vit', {'img_size': 32}),
])
def test_every_gcp_model_takes_the_map_as_a_kwarg(arch, kwargs):
    model = timm.create_model(arch, gcp_dim=8, num_classes=3, riemannian='log_emlr', **kwargs).eval()
    assert model.global_pool.riemannian == 'log_emlr' and model.gcp_model_args()['riemannian'] == 'log_emlr'
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
