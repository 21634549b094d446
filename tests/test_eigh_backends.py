"""Eigendecomposition backends: selection, fallback, error paths (CPU) and the cuSOLVER backend itself (CUDA)."""
import ctypes.util
import glob
import importlib.util
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from timm_gcp import covariance, create_meta_layer, list_meta_layers
from timm_gcp.meta_layers import SpectralPower
from timm_gcp.ops import EIGH_BACKENDS, auto_eigh_backend, eigh
from timm_gcp.ops.cusolver_eigh import (
    CUSOLVER_LIB_ENV, _thread_state, check_cusolver_failures, cusolver_eigh, cusolver_status)
from timm_gcp.ops.eigh_backends import _DifferentiableEigh

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def test_unknown_backend_is_one_clear_error():
    assert EIGH_BACKENDS == ('auto', 'torch', 'cusolver')
    for bad in ('nope', None, 3):
        with pytest.raises(ValueError, match=rf"^eigh backend must be one of 'auto', 'torch', 'cusolver', got "):
            eigh(torch.eye(3)[None], bad)


def test_auto_on_cpu_is_torch_without_warning():
    a = covariance(torch.randn(3, 6, 20, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert auto_eigh_backend(a.device, a.dtype) == 'torch'
        values, vectors = eigh(a)
    ref_values, ref_vectors = torch.linalg.eigh(a)
    assert torch.equal(values, ref_values) and torch.equal(vectors, ref_vectors)


def test_cusolver_rejects_cpu_and_unsupported_dtypes():
    with pytest.raises(ValueError, match='needs a CUDA tensor.*"torch" or "auto"'):
        eigh(torch.eye(4)[None], 'cusolver')
    with pytest.raises(TypeError, match='float32 or float64.*float16'):
        eigh(torch.eye(4, dtype=torch.float16)[None], 'cusolver')


def test_missing_library_falls_back_with_one_warning(monkeypatch, tmp_path):
    missing = str(tmp_path / 'libcusolver.so.99')
    monkeypatch.setenv(CUSOLVER_LIB_ENV, missing)
    available, reason = cusolver_status()
    assert not available and missing in reason
    cuda = torch.device('cuda')
    with pytest.warns(RuntimeWarning, match='falling back to torch.linalg.eigh') as record:
        assert auto_eigh_backend(cuda) == 'torch'
        assert auto_eigh_backend(cuda) == 'torch'
    assert len([w for w in record if 'falling back' in str(w.message)]) == 1
    assert auto_eigh_backend(torch.device('cpu')) == 'torch'


@pytest.mark.skipif(ctypes.util.find_library('c') is None, reason='needs a libc to load')
def test_library_without_batched_solver_is_reported(monkeypatch):
    monkeypatch.setenv(CUSOLVER_LIB_ENV, ctypes.util.find_library('c'))
    available, reason = cusolver_status()
    assert not available and 'no cusolverDnXsyevBatched' in reason


def test_finds_the_library_torch_ships():
    spec = importlib.util.find_spec('nvidia')
    roots = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    shipped = [p for root in roots for p in glob.glob(os.path.join(root, '*', 'lib', 'libcusolver.so*'))]
    available, where = cusolver_status()
    if shipped:
        assert available, where
    if available:
        assert 'libcusolver.so' in where


def test_import_touches_neither_cuda_nor_cusolver():
    code = ('import timm_gcp, torch\n'
            'from timm_gcp.ops.cusolver_eigh import _load\n'
            'assert not torch.cuda.is_initialized()\n'
            'assert _load.cache_info().currsize == 0\n')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


def _detached_solver_eigh(a: torch.Tensor):
    """The cusolver backend's autograd wrapper around a solver that autograd cannot see through."""
    return _DifferentiableEigh.apply(a, lambda m: torch.linalg.eigh(m.detach()))


def test_differentiable_wrapper_matches_torch_eigh_gradients():
    a = covariance(torch.randn(3, 6, 20, dtype=torch.float64)).requires_grad_()
    grad_values, grad_vectors = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, 6, dtype=torch.float64)
    grads = []
    for fn in (torch.linalg.eigh, _detached_solver_eigh):
        values, vectors = fn(a)
        grads.append(torch.autograd.grad((values * grad_values).sum() + (vectors * grad_vectors).sum(), a)[0])
        grads.append(torch.autograd.grad(fn(a)[0].pow(2).sum(), a)[0])  # eigenvalues only
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[3], grads[1], rtol=1e-10, atol=1e-10)


def test_differentiable_wrapper_backward_ignores_autocast():
    a = covariance(torch.randn(2, 6, 20)).requires_grad_()
    grad_vectors = torch.randn(2, 6, 6)
    grads = []
    for backward_in_autocast in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=backward_in_autocast):
            grads.append(torch.autograd.grad((_detached_solver_eigh(a)[1] * grad_vectors).sum(), a)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


# ---- CUDA: the cuSOLVER backend itself ----

def _adversarial(dtype: torch.dtype) -> dict:
    """Symmetric batches, built in float64 on the CPU."""
    d = 64
    q, _ = torch.linalg.qr(torch.randn(4, d, d, dtype=torch.float64))
    spectrum = lambda v: (q * v[:, None, :]) @ q.mT  # noqa: E731
    cases = {
        'full_rank': covariance(torch.randn(8, d, 256, dtype=torch.float64)),
        'rank_deficient': covariance(torch.randn(8, d, 20, dtype=torch.float64)),
        'repeated': spectrum(torch.tensor([1.] * 32 + [2.] * 31 + [5.], dtype=torch.float64).expand(4, d)),
        'clustered': spectrum(1 + 1e-7 * torch.rand(4, d, dtype=torch.float64)),
        'zero': torch.zeros(3, d, d, dtype=torch.float64),
        'graded': spectrum(torch.logspace(-8, 8, d, dtype=torch.float64).expand(4, d)),
        'batch1': covariance(torch.randn(1, d, 100, dtype=torch.float64)),
        'd1': torch.rand(5, 1, 1, dtype=torch.float64),
    }
    return {name: a.to(dtype) for name, a in cases.items()}


def _check_decomposition(a: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor, tol: float, what: str) -> None:
    a64, values64, vectors64 = a.double().cpu(), values.double().cpu(), vectors.double().cpu()
    scale = torch.linalg.matrix_norm(a64, ord=2).clamp_min(1e-300)[:, None]
    ref = torch.linalg.eigvalsh(a64)
    assert ((values64 - ref).abs() / scale).max() < tol, f'{what}: eigenvalues'
    residual = a64 @ vectors64 - vectors64 * values64[:, None, :]
    assert (torch.linalg.matrix_norm(residual) / scale[:, 0]).max() < tol * a.shape[-1], f'{what}: residual'
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    assert (vectors64.mT @ vectors64 - eye).abs().max() < tol * a.shape[-1], f'{what}: orthogonality'


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_cusolver_matches_float64_reference(dtype, tol):
    for name, a in _adversarial(dtype).items():
        values, vectors = cusolver_eigh(a.cuda())
        assert values.dtype == vectors.dtype == dtype
        _check_decomposition(a, values, vectors, tol, f'{name} {dtype}')


@pytest.mark.cuda
@needs_cuda
def test_cusolver_is_auto_on_cuda_and_differentiable():
    assert auto_eigh_backend(torch.device('cuda')) == 'cusolver'
    a = covariance(torch.randn(4, 12, 40, dtype=torch.float64, device='cuda')).requires_grad_()
    g = torch.randn(4, 12, 12, dtype=torch.float64, device='cuda')
    grads = []
    for backend in ('torch', 'cusolver'):
        values, vectors = eigh(a, backend)
        # sign-invariant loss: a matrix function of the eigendecomposition
        loss = ((vectors * values.sqrt()[:, None, :]) @ vectors.mT * g).sum()
        grads.append(torch.autograd.grad(loss, a)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


@pytest.mark.cuda
@needs_cuda
def test_cusolver_runs_on_the_current_stream():
    src = covariance(torch.randn(16, 128, 300, device='cuda'))
    ref_values = torch.linalg.eigvalsh(src.double().cpu())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # the input is written only after this: a solver on another stream reads junk
        a = torch.empty_like(src).copy_(src)
        values, _ = cusolver_eigh(a)
    stream.synchronize()
    assert ((values.double().cpu() - ref_values).abs().max() / ref_values.abs().max()) < 1e-5


@pytest.mark.cuda
@needs_cuda
def test_cusolver_names_the_failing_batch_element():
    good = covariance(torch.randn(4, 8, 20, device='cuda'))
    bad = good.clone()
    bad[2, 3, 3] = float('nan')
    cusolver_eigh(bad)  # queued, does not stall the GPU
    with pytest.raises(torch.linalg.LinAlgError, match=r'batch element\(s\) \[2\] of an input of shape \(4, 8, 8\)'):
        check_cusolver_failures()
    check_cusolver_failures()  # reported once
    cusolver_eigh(bad)
    torch.cuda.synchronize()
    with pytest.raises(torch.linalg.LinAlgError, match=r'batch element\(s\) \[2\]'):
        cusolver_eigh(good)  # the next call reports the earlier failure
    cusolver_eigh(good)
    check_cusolver_failures()
    with pytest.raises(ValueError, match=r'\(B, d, d\)'):
        cusolver_eigh(torch.zeros(2, 3, 4, device='cuda'))


@pytest.mark.cuda
@needs_cuda
def test_cusolver_reuses_its_workspace():
    a = covariance(torch.randn(8, 32, 50, device='cuda'))
    cusolver_eigh(a)
    workspaces = dict(_thread_state().workspaces)
    cusolver_eigh(a * 2)
    assert {k: v[0].data_ptr() for k, v in _thread_state().workspaces.items()} == \
        {k: v[0].data_ptr() for k, v in workspaces.items()}


@pytest.mark.cuda
@needs_cuda
def test_cusolver_one_handle_per_thread():
    a = covariance(torch.randn(8, 32, 50, dtype=torch.float64, device='cuda'))
    ref = torch.linalg.eigvalsh(a.cpu())
    barrier, handles, errors = threading.Barrier(4), [], []

    def work():
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(5):
                    values, _ = cusolver_eigh(a)
                torch.cuda.current_stream().synchronize()
            torch.testing.assert_close(values.cpu(), ref, rtol=1e-12, atol=1e-12)
            handles.append(_thread_state().handles[a.device.index])
            barrier.wait(timeout=60)  # keep every thread alive until all have their handle
        except Exception as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(handles)) == 4


@pytest.mark.cuda
@needs_cuda
def test_every_meta_layer_with_cusolver_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    cov = covariance(torch.randn(4, 16, 64, dtype=torch.float64))
    grad = torch.randn(4, 16, 16, dtype=torch.float64)
    for name in list_meta_layers():
        results = []
        for device, dtype, backend in (('cpu', torch.float64, 'torch'), ('cuda', torch.float32, 'cusolver')):
            layer = create_meta_layer(name).to(device).eval()
            if isinstance(layer, SpectralPower):
                layer.eigh_backend = backend
            leaf = cov.to(device, dtype).detach().clone().requires_grad_()
            out = layer(leaf)
            out.backward(grad.to(device, out.dtype))
            results.append((out.double().cpu(), leaf.grad.double().cpu()))
        (ref_out, ref_grad), (out, grad_in) = results
        assert ((out - ref_out).norm() / ref_out.norm()) < 1e-4, f'{name}: forward'
        assert ((grad_in - ref_grad).norm() / ref_grad.norm()) < 1e-3, f'{name}: backward'
