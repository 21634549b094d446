"""covariance and triu_vec against independent float64 references."""
import pytest
import torch

import timm_gcp


def reference_covariance(x: torch.Tensor) -> torch.Tensor:
    """The official formulation, in float64: X Ī Xᵀ with the M x M centring matrix Ī = (1/M)(I − 11ᵀ/M)."""
    x = x.flatten(2).double()
    m = x.shape[-1]
    centring = (torch.eye(m, dtype=torch.float64) - torch.full((m, m), 1.0 / m, dtype=torch.float64)) / m
    return x @ centring @ x.transpose(1, 2)


@pytest.mark.parametrize('shape', [(2, 16, 7, 7), (3, 8, 196), (1, 4, 1, 5)])
def test_covariance_matches_float64_reference(shape):
    x = torch.randn(shape) * 3 + 1.5
    cov = timm_gcp.covariance(x)
    assert cov.dtype == torch.float32 and cov.shape == (shape[0], shape[1], shape[1])
    torch.testing.assert_close(cov.double(), reference_covariance(x), rtol=1e-5, atol=1e-5)


def test_covariance_float64_stays_float64():
    x = torch.randn(2, 6, 50, dtype=torch.float64)
    cov = timm_gcp.covariance(x)
    assert cov.dtype == torch.float64
    torch.testing.assert_close(cov, reference_covariance(x), rtol=1e-12, atol=1e-12)


def test_covariance_never_builds_an_m_by_m_matrix():
    # an M x M float32 centring matrix for M = 400,000 would need 640 GB: this only runs without one
    x = torch.randn(1, 2, 400_000)
    cov = timm_gcp.covariance(x)
    torch.testing.assert_close(cov[0], torch.cov(x[0], correction=0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_covariance_is_float32_under_autocast(dtype):
    x = torch.randn(2, 8, 5, 5).to(dtype)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cov = timm_gcp.covariance(x)
    assert cov.dtype == torch.float32
    # computed from the low-precision values in float32, not rounded to bf16 on the way
    torch.testing.assert_close(cov.double(), reference_covariance(x.float()), rtol=1e-5, atol=1e-6)


def test_covariance_gradient_matches_reference():
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(timm_gcp.covariance, (x,))


@pytest.mark.parametrize('shape', [(4, 4), (2, 3, 4, 5, 6), (2, 3, 0)])
def test_covariance_rejects_bad_input(shape):
    with pytest.raises(ValueError, match=r'\(B, C, H, W\) or \(B, C, M\)|at least one spatial position'):
        timm_gcp.covariance(torch.randn(shape))


@pytest.mark.parametrize('d', [1, 3, 256])
def test_triu_vec_follows_triu_indices_order(d):
    m = torch.randn(2, d, d)
    rows, cols = torch.triu_indices(d, d)
    vec = timm_gcp.triu_vec(m)
    assert vec.shape == (2, d * (d + 1) // 2)
    torch.testing.assert_close(vec, m[:, rows, cols], rtol=0, atol=0)
    if d == 3:  # row-major upper triangle, spelled out
        assert vec[0].tolist() == [m[0, i, j].item() for i in range(3) for j in range(i, 3)]


def test_triu_vec_trains_after_inference_mode():
    d = 11  # a size no other test uses: its cached index is first built under inference_mode
    with torch.inference_mode():
        timm_gcp.triu_vec(torch.randn(1, d, d))
    m = torch.randn(2, d, d, requires_grad=True)
    timm_gcp.triu_vec(m).sum().backward()
    assert torch.equal(m.grad, torch.ones(d, d).triu().expand(2, d, d))


@pytest.mark.parametrize('shape', [(3, 3), (2, 3, 4), (1, 2, 2, 2)])
def test_triu_vec_rejects_non_square_batches(shape):
    with pytest.raises(ValueError, match=r'\(B, d, d\)'):
        timm_gcp.triu_vec(torch.randn(shape))
