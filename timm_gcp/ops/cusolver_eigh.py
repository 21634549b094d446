"""Batched symmetric eigendecomposition on CUDA through cuSOLVER's `cusolverDnXsyevBatched` (ctypes), in the
libcusolver PyTorch's CUDA wheels ship (loaded on first use; `TIMM_GCP_CUSOLVER_LIB` overrides where it is looked for).

Failed solves never stall the GPU: they raise `torch.linalg.LinAlgError` at the next call on the same thread, or in
`check_cusolver_failures()`, which waits. Design: docs/meta_layers.md.
"""
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import threading
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .covariance import check_square_batch

__all__ = ['cusolver_eigh', 'check_cusolver_failures', 'cusolver_status', 'find_cusolver_library',
           'CUSOLVER_LIB_ENV']

CUSOLVER_LIB_ENV = 'TIMM_GCP_CUSOLVER_LIB'
_SYMBOL = 'cusolverDnXsyevBatched'

# cuSOLVER / CUDA enum values (cusolver_common.h, library_types.h, cublas_api.h)
_EIG_MODE_VECTOR = 1
# upper triangle of the column-major matrix = lower triangle of the row-major one (torch's UPLO='L')
_FILL_MODE_UPPER = 1
_CUDA_DTYPE = {torch.float32: 0, torch.float64: 1}  # CUDA_R_32F, CUDA_R_64F

_i64, _vp, _int, _sz = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {
    'cusolverDnCreate': [ctypes.POINTER(_vp)],
    'cusolverDnCreateParams': [ctypes.POINTER(_vp)],
    'cusolverDnSetStream': [_vp, _vp],
    'cusolverDnXsyevBatched_bufferSize': [
        _vp, _vp, _int, _int, _i64, _int, _vp, _i64, _int, _vp, _int, ctypes.POINTER(_sz), ctypes.POINTER(_sz), _i64],
    _SYMBOL: [
        _vp, _vp, _int, _int, _i64, _int, _vp, _i64, _int, _vp, _int, _vp, _sz, _vp, _sz, _vp, _i64],
}


def _loaded_libraries() -> List[str]:
    """Paths of libcusolver already mapped into this process (e.g. by torch.linalg)."""
    try:
        with open('/proc/self/maps') as maps:
            return sorted({line.split()[-1] for line in maps if 'libcusolver.so' in line and '/' in line})
    except OSError:
        return []


def _wheel_libraries() -> List[str]:
    """libcusolver from the `nvidia` pip packages beside torch, then torch/lib."""
    spec = importlib.util.find_spec('nvidia')
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    roots.append(os.path.dirname(torch.__file__))
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, '*', 'lib', 'libcusolver.so*')))
        found += sorted(glob.glob(os.path.join(root, 'lib', 'libcusolver.so*')))
    return found


def find_cusolver_library(override: Optional[str] = None) -> List[str]:
    """Candidate libcusolver paths, best first: `override` alone if given, else loaded, wheel, system."""
    if override:
        return [override]
    system = ctypes.util.find_library('cusolver')
    return _loaded_libraries() + _wheel_libraries() + ([system] if system else [])


@functools.lru_cache(maxsize=None)
def _load(override: Optional[str]) -> Tuple[Optional[ctypes.CDLL], str]:
    """The first candidate that loads and exports the batched solver, or None and why none did.
    Searched once per value of $TIMM_GCP_CUSOLVER_LIB."""
    reasons = []
    for path in find_cusolver_library(override):
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            reasons.append(f'{path}: {e}')
            continue
        if not hasattr(lib, _SYMBOL):
            reasons.append(f'{path}: no {_SYMBOL} (needs cuSOLVER from CUDA 12.6 on)')
            continue
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return lib, path
    return None, '; '.join(reasons) or 'no libcusolver found (CPU-only torch?)'


def cusolver_status() -> Tuple[bool, str]:
    """(available, library path or the reason it is not). Loads the library; never touches the GPU."""
    lib, where = _load(os.environ.get(CUSOLVER_LIB_ENV))
    return lib is not None, where


def _library() -> ctypes.CDLL:
    lib, where = _load(os.environ.get(CUSOLVER_LIB_ENV))
    if lib is None:
        raise RuntimeError(f'cuSOLVER {_SYMBOL} is not available: {where}. '
                           f'Use the eigh backend "torch", or set {CUSOLVER_LIB_ENV} to a libcusolver.so')
    return lib


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f'{call} failed with cusolverStatus_t {status}')


# Handles outlive the threads that made them: a finished thread's handles go back to a pool for the next thread.
_free_handles: Dict[int, List[Tuple[int, int]]] = {}
_pool_lock = threading.Lock()


class _PendingCheck(NamedTuple):
    done: torch.cuda.Event
    info: torch.Tensor  # pinned host copies, (B,)
    finite: torch.Tensor
    shape: Tuple[int, ...]


class _ThreadState:
    """Per-thread cuSOLVER state: (handle, params) per device; workspaces per (device, stream); queued checks."""

    def __init__(self):
        self.handles: Dict[int, Tuple[int, int]] = {}
        self.workspaces: Dict[Tuple[int, int], Tuple[torch.Tensor, ctypes.Array]] = {}
        self.buffer_sizes: Dict[Tuple[int, torch.dtype, int, int], Tuple[int, int]] = {}
        self.pending: List[_PendingCheck] = []
        weakref.finalize(self, _return_handles, self.handles)

    def handle(self, lib: ctypes.CDLL, device: int) -> Tuple[int, int]:
        if device not in self.handles:
            with _pool_lock:
                pooled = _free_handles.get(device)
                reused = pooled.pop() if pooled else None
            self.handles[device] = reused or _create_handle(lib, device)
        return self.handles[device]

    def workspace(self, device: torch.device, stream: int, device_bytes: int, host_bytes: int
                  ) -> Tuple[torch.Tensor, ctypes.Array]:
        """Buffers of at least the given sizes, reused (and grown) per (device, stream)."""
        key = (device.index, stream)
        cached = self.workspaces.get(key)
        if cached is None or cached[0].numel() < device_bytes or len(cached[1]) < host_bytes:
            cached = self.workspaces[key] = (
                torch.empty(max(device_bytes, 1), dtype=torch.uint8, device=device),
                ctypes.create_string_buffer(max(host_bytes, 1)))
        return cached


def _create_handle(lib: ctypes.CDLL, device: int) -> Tuple[int, int]:
    handle, params = _vp(), _vp()
    with torch.cuda.device(device):
        _check(lib.cusolverDnCreate(ctypes.byref(handle)), 'cusolverDnCreate')
    _check(lib.cusolverDnCreateParams(ctypes.byref(params)), 'cusolverDnCreateParams')
    return handle.value, params.value


def _return_handles(handles: Dict[int, Tuple[int, int]]) -> None:
    with _pool_lock:
        for device, handle in handles.items():
            _free_handles.setdefault(device, []).append(handle)


_local = threading.local()


def _thread_state() -> _ThreadState:
    if not hasattr(_local, 'state'):
        _local.state = _ThreadState()
    return _local.state


def _check_input(a: torch.Tensor) -> None:
    if a.dtype not in _CUDA_DTYPE:
        raise TypeError(f'the cusolver eigh backend takes float32 or float64, got {a.dtype}')
    if a.device.type != 'cuda':
        raise ValueError(f'the cusolver eigh backend needs a CUDA tensor, got one on {a.device}; '
                         'use the "torch" or "auto" backend for other devices')
    check_square_batch(a, 'eigh input')


def _queue_check(state: _ThreadState, info: torch.Tensor, eigenvalues: torch.Tensor, shape: Tuple[int, ...]) -> None:
    """Copy each matrix's info and whether its eigenvalues are finite to the host, without waiting."""
    host_info = torch.empty(info.shape, dtype=info.dtype, pin_memory=True)
    host_finite = torch.empty(info.shape, dtype=torch.bool, pin_memory=True)
    host_info.copy_(info, non_blocking=True)
    host_finite.copy_(torch.isfinite(eigenvalues).all(dim=-1), non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(info.device))
    state.pending.append(_PendingCheck(done, host_info, host_finite, shape))


def _raise_finished_failures(state: _ThreadState, wait: bool) -> None:
    """Raise for the first failed solve among this thread's finished calls (all calls when `wait`)."""
    finished, unfinished = [], []
    for check in state.pending:
        if wait:
            check.done.synchronize()
        (finished if check.done.query() else unfinished).append(check)
    state.pending = unfinished
    for check in finished:
        index = (check.info.ne(0) | ~check.finite).nonzero().flatten().tolist()
        if index:
            codes = check.info[index].tolist()
            raise torch.linalg.LinAlgError(
                f'{_SYMBOL} failed for batch element(s) {index[:16]}{" ..." if len(index) > 16 else ""} of an input '
                f'of shape {check.shape} (info {codes[:16]}; info 0 with a failure means non-finite eigenvalues, '
                'e.g. NaN/Inf in the input)')


def check_cusolver_failures() -> None:
    """Wait for this thread's cuSOLVER eigendecompositions and raise LinAlgError naming any failed batch element."""
    _raise_finished_failures(_thread_state(), wait=True)


@torch.no_grad()
def cusolver_eigh(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (B, d) ascending and eigenvectors (B, d, d) in columns of symmetric float32/float64 CUDA matrices.

    Reads the lower triangle (like `torch.linalg.eigh`); `a` is not modified. Not differentiable on its own.
    Raises LinAlgError for failures of earlier calls that have finished (see the module docstring).
    """
    _check_input(a)
    lib = _library()
    state = _thread_state()
    _raise_finished_failures(state, wait=False)
    batch, n = a.shape[0], a.shape[-1]
    if batch == 0 or n == 0:
        return a.new_empty(batch, n), a.new_empty(batch, n, n)
    device = a.device
    handle, params = state.handle(lib, device.index)
    stream = torch.cuda.current_stream(device).cuda_stream
    _check(lib.cusolverDnSetStream(handle, stream), 'cusolverDnSetStream')
    # Column-major in place: the solver overwrites this copy with the eigenvectors.
    vectors = a.clone(memory_format=torch.contiguous_format)
    values = a.new_empty(batch, n)
    info = torch.empty(batch, dtype=torch.int32, device=device)
    dtype = _CUDA_DTYPE[a.dtype]
    size_key = (device.index, a.dtype, n, batch)
    if size_key not in state.buffer_sizes:
        device_bytes, host_bytes = _sz(), _sz()
        _check(lib.cusolverDnXsyevBatched_bufferSize(
            handle, params, _EIG_MODE_VECTOR, _FILL_MODE_UPPER, n, dtype, vectors.data_ptr(), n, dtype,
            values.data_ptr(), dtype, ctypes.byref(device_bytes), ctypes.byref(host_bytes), batch),
            f'{_SYMBOL}_bufferSize')
        state.buffer_sizes[size_key] = device_bytes.value, host_bytes.value
    device_bytes, host_bytes = state.buffer_sizes[size_key]
    device_work, host_work = state.workspace(device, stream, device_bytes, host_bytes)
    _check(lib.cusolverDnXsyevBatched(
        handle, params, _EIG_MODE_VECTOR, _FILL_MODE_UPPER, n, dtype, vectors.data_ptr(), n, dtype,
        values.data_ptr(), dtype, device_work.data_ptr(), device_bytes, ctypes.addressof(host_work),
        host_bytes, info.data_ptr(), batch), _SYMBOL)
    _queue_check(state, info, values, tuple(a.shape))
    # Row i of the column-major result is eigenvector i: transpose to put eigenvectors in columns.
    return values, vectors.transpose(-1, -2)
