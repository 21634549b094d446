"""The fused Newton-Schulz square root computes the paper's formulation's numbers (tests/reference_isqrt.py, plain
autograd), forward and backward, and converges to the exact root."""
import pytest
import torch

from timm_gcp import covariance, create_meta_layer
from timm_gcp.meta_layers.newton_schulz import newton_schulz_sqrt

from reference_isqrt import reference_newton_schulz_sqrt

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def _inputs(dtype: torch.dtype, device: str = 'cpu'):
    """Covariances that stress the iteration: full rank, rank-deficient, repeated spectrum, zero, extreme scales."""
    full = covariance(torch.randn(3, 16, 64, dtype=dtype, device=device))
    deficient = covariance(torch.randn(2, 16, 5, dtype=dtype, device=device))
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=dtype, device=device))
    repeated = (q * torch.tensor([1.] * 8 + [3.] * 8, dtype=dtype, device=device)) @ q.T
    return {
        'full': full, 'rank_deficient': deficient, 'repeated': repeated[None],
        'zero': torch.zeros(2, 16, 16, dtype=dtype, device=device),
        'tiny': full * 1e-8, 'huge': full * 1e8, 'batch1': full[:1],
        'non_contiguous': full.transpose(-1, -2),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(cov: torch.Tensor, num_iter: int, tol: float, fused=newton_schulz_sqrt) -> None:
    """`fused(cov, num_iter)` gives the reference's output and gradient (both symmetrise their input, so the gradient
    is symmetric)."""
    grad = torch.randn_like(cov)  # not symmetric: the triu head's gradient is not either
    results = []
    for fn in (reference_newton_schulz_sqrt, fused):
        leaf = cov.detach().requires_grad_()
        out = fn(leaf, num_iter)
        out.backward(grad)
        assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()
        results.append((out, leaf.grad))
    (ref_out, ref_grad), (out, grad_in) = results
    assert _rel(out, ref_out) < tol
    assert _rel(grad_in, ref_grad) < tol


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('num_iter', [1, 2, 3, 5])
def test_matches_reference_forward_and_backward(dtype, num_iter):
    for name, cov in _inputs(dtype).items():
        try:
            _compare(cov, num_iter, TOL[dtype])
        except AssertionError as e:
            raise AssertionError(f'{name}, {dtype}, num_iter={num_iter}: {e}') from e


@pytest.mark.parametrize('num_iter', [1, 2, 3])
def test_gradcheck_float64(num_iter):
    cov = covariance(torch.randn(2, 6, 9, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: newton_schulz_sqrt(c, num_iter), (cov,))


def test_gradient_is_symmetric_and_reaches_features_like_the_reference():
    features = torch.randn(3, 12, 30, dtype=torch.float64)
    grad = torch.randn(3, 12, 12, dtype=torch.float64)
    feature_grads = []
    for fn in (reference_newton_schulz_sqrt, newton_schulz_sqrt):
        leaf = features.clone().requires_grad_()
        cov = covariance(leaf)
        cov.retain_grad()
        fn(cov, 5).backward(grad)
        feature_grads.append(leaf.grad)
        assert _rel(cov.grad, cov.grad.mT) < 1e-14
    assert _rel(feature_grads[1], feature_grads[0]) < 1e-13


def test_converges_to_exact_root():
    cov = covariance(torch.randn(2, 8, 40, dtype=torch.float64))
    values, vectors = torch.linalg.eigh(cov)
    exact = vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.mT
    assert _rel(newton_schulz_sqrt(cov, 30), exact) < 1e-10


@pytest.mark.parametrize('num_iter', [1, 5])
def test_isqrt_meta_layer_matches_reference(num_iter):
    cov = covariance(torch.randn(2, 8, 20, dtype=torch.float64))
    _compare(cov, num_iter, 1e-13, fused=lambda c, n: create_meta_layer('isqrt', num_iter=n)(c))


def test_rejects_zero_iterations():
    with pytest.raises(ValueError, match='num_iter'):
        newton_schulz_sqrt(torch.eye(3)[None], 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_matches_reference_on_cuda(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, cov in _inputs(dtype, 'cuda').items():
        try:
            _compare(cov, 5, 20 * TOL[dtype])
        except AssertionError as e:
            raise AssertionError(f'{name}, {dtype}: {e}') from e


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_compiled_isqrt_matches_reference_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    layer = create_meta_layer('isqrt', compile=True)
    for _ in range(3):  # compile, record, replay the CUDA graphs
        cov = covariance(torch.randn(8, 32, 100, device='cuda')).requires_grad_()
        grad = torch.randn_like(cov)
        out = layer(cov)
        out.backward(grad)
        ref_cov = cov.detach().clone().requires_grad_()
        ref = reference_newton_schulz_sqrt(ref_cov)
        ref.backward(grad)
        assert _rel(out.detach(), ref.detach()) < 2e-5 and _rel(cov.grad, ref_cov.grad) < 2e-5


@pytest.mark.slow
def test_compiled_isqrt_matches_reference_on_cpu():
    cov = covariance(torch.randn(2, 8, 20)).requires_grad_()
    out = create_meta_layer('isqrt', num_iter=3, compile=True)(cov)
    out.backward(torch.ones_like(out))
    ref_cov = cov.detach().clone().requires_grad_()
    ref = reference_newton_schulz_sqrt(ref_cov, 3)
    ref.backward(torch.ones_like(ref))
    assert _rel(out.detach(), ref.detach()) < 2e-6 and _rel(cov.grad, ref_cov.grad) < 2e-6


@pytest.mark.slow
def test_fused_function_is_traced_whole_by_torch_compile():
    """Inside a compiled model the fused forward and hand-derived backward are traced as one graph (no break)."""
    layer = create_meta_layer('isqrt', num_iter=3)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    cov = covariance(torch.randn(2, 8, 20))
    grad = torch.randn_like(cov)
    grads = []
    for fn in (compiled, layer):
        leaf = cov.clone().requires_grad_()
        fn(leaf).backward(grad)
        grads.append(leaf.grad)
    assert _rel(grads[0], grads[1]) < 1e-6
