"""Every meta-layer and RiemGCP map, forward and backward, on spectra that break naive implementations: no NaN or Inf
anywhere.

The test id names the method and the case, e.g. `test_finite_forward_and_backward[svd_pade-all_zero_maps]`.
"""
from typing import Callable, Dict, Tuple

import pytest
import torch

import timm_gcp
from timm_gcp.layers import RIEMANNIAN_MAPS, RiemannianMap

METHODS = timm_gcp.list_meta_layers()


def features(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape) * scale


def spectrum(*evals: float, repeat: int) -> torch.Tensor:
    """(2, d, d) float32 covariances with each eigenvalue repeated `repeat` times, random eigenvectors."""
    values = torch.tensor(evals, dtype=torch.float64).repeat_interleave(repeat)
    q, _ = torch.linalg.qr(torch.randn(2, values.numel(), values.numel(), dtype=torch.float64))
    return ((q * values) @ q.transpose(1, 2)).float()


# each case: () -> (leaf tensor, covariance built from it, autocast dtype or None)
Case = Callable[[], Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], object]]
CASES: Dict[str, Case] = {
    'rank_deficient_M196_d256': lambda: (features(1, 256, 196), timm_gcp.covariance, None),
    'rank_one': lambda: (torch.randn(2, 32, 1) * torch.randn(2, 1, 49), timm_gcp.covariance, None),
    'repeated_eigenvalues': lambda: (spectrum(0.5, 2.0, repeat=16), lambda c: c, None),
    'all_equal_eigenvalues': lambda: (torch.eye(32).repeat(2, 1, 1) * 3, lambda c: c, None),
    'all_zero_maps': lambda: (torch.zeros(2, 32, 7, 7), timm_gcp.covariance, None),
    'constant_maps': lambda: (torch.randn(2, 32, 1, 1).expand(2, 32, 7, 7).contiguous(), timm_gcp.covariance, None),
    'features_scale_1e-8': lambda: (features(2, 32, 49, scale=1e-8), timm_gcp.covariance, None),
    'features_scale_1e8': lambda: (features(2, 32, 49, scale=1e8), timm_gcp.covariance, None),
    'covariance_scale_1e-8': lambda: (spectrum(0.1, 1.0, repeat=16) * 1e-8, lambda c: c, None),
    'covariance_scale_1e8': lambda: (spectrum(0.1, 1.0, repeat=16) * 1e8, lambda c: c, None),
    'bf16_autocast': lambda: (features(2, 32, 49).bfloat16(), timm_gcp.covariance, torch.bfloat16),
    'fp16_autocast': lambda: (features(2, 32, 49).half(), timm_gcp.covariance, torch.float16),
    'batch_1': lambda: (features(1, 32, 49), timm_gcp.covariance, None),
    'non_contiguous_features': lambda: (features(2, 49, 32), lambda x: timm_gcp.covariance(x.transpose(1, 2)), None),
    'non_contiguous_covariance': lambda: (features(2, 64, 49), lambda x: timm_gcp.covariance(x)[:, ::2, ::2], None),
}


def run_case(case: str, layer: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """`layer` on the covariances of `case`, forward and backward: (its output, the gradient of the leaf)."""
    leaf, to_covariance, autocast_dtype = CASES[case]()
    leaf.requires_grad_()
    with torch.autocast('cpu', dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        cov = to_covariance(leaf)
        out = layer(cov)
        loss = (timm_gcp.triu_vec(out) * torch.randn(out.shape[0], out.shape[1] * (out.shape[1] + 1) // 2)).sum()
    loss.backward()
    return out, leaf.grad


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('method', METHODS)
def test_finite_forward_and_backward(method, case):
    out, grad = run_case(case, timm_gcp.create_meta_layer(method))
    assert out.dtype == torch.float32, f'{method} on {case}: output dtype {out.dtype}'
    assert torch.isfinite(out).all(), f'{method} on {case}: non-finite output'
    assert torch.isfinite(grad).all(), f'{method} on {case}: non-finite gradient'


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('name', [m for m in RIEMANNIAN_MAPS if m != 'pow_emlr'])
def test_riemannian_maps_finite_forward_and_backward(name, case):
    """RiemGCP's maps on the iSQRT root of the same spectra (`timm_gcp.layers.RiemannianMap`)."""
    root, riemannian_map = timm_gcp.create_meta_layer('isqrt'), RiemannianMap(name)
    out, grad = run_case(case, lambda cov: riemannian_map(root(cov), root.power))
    assert out.dtype == torch.float32, f'{name} on {case}: output dtype {out.dtype}'
    assert torch.isfinite(out).all(), f'{name} on {case}: non-finite output'
    assert torch.isfinite(grad).all(), f'{name} on {case}: non-finite gradient'


@pytest.mark.parametrize('method', METHODS)
def test_square_root_layers_stay_close_on_low_precision_input(method):
    """Under bf16 autocast the result equals the float32 computation on the same (rounded) features."""
    x = features(2, 16, 49).bfloat16()
    layer = timm_gcp.create_meta_layer(method)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(timm_gcp.covariance(x))
    reference = layer(timm_gcp.covariance(x.float()))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('method', [m for m in METHODS if timm_gcp.create_meta_layer(m).power is not None])
def test_zero_covariance_maps_to_zero(method):
    """The matrix power of the all-zero covariance is (numerically) zero, not NaN nor the eps floor blown up."""
    out = timm_gcp.create_meta_layer(method)(torch.zeros(1, 8, 8))
    assert out.abs().max() < 1e-9, f'{method}: {out.abs().max()}'


def test_sparse_inverse_of_the_zero_covariance_is_finite():
    """iSICE's inverse has no zero limit: with the trace floored at tiny^¼, P = I/λ (the graphical lasso solution for
    C = 0) divided by that floor, finite, and so is its gradient."""
    leaf = torch.zeros(1, 8, 8, requires_grad=True)
    out = timm_gcp.create_meta_layer('isice', lam=0.01)(leaf)
    floor = torch.finfo(torch.float32).tiny ** 0.25
    torch.testing.assert_close(out, torch.eye(8)[None] / (0.01 * floor))
    out.backward(torch.randn(1, 8, 8))
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize('method', METHODS)
def test_backward_inside_autocast_stays_float32(method):
    """A backward called inside an autocast region computes what it computes outside (custom backwards included)."""
    cov = timm_gcp.covariance(features(2, 16, 49))
    upstream = torch.randn(2, 16, 16)
    layer = timm_gcp.create_meta_layer(method)
    grads = []
    for backward_in_autocast in (False, True):
        leaf = cov.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(leaf)
            if backward_in_autocast:
                out.backward(upstream)
        if not backward_in_autocast:
            out.backward(upstream)
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6, msg=lambda m: f'{method}: {m}')
