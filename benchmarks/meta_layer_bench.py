"""Meta-layer micro-benchmarks: forward and forward+backward of each meta-layer (and of RiemGCP's maps after isqrt) on
the covariance of random features, with the memory a forward keeps for its backward.

The input is `covariance(randn(B, d, M))`, computed once outside the timed region: only the meta-layer is timed.
"""
import itertools
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from timm_gcp import covariance, create_meta_layer
from timm_gcp.layers import RIEMANNIAN_MAPS, RiemannianMap
from timm_gcp.meta_layers import SpectralPower
from timm_gcp.ops import eigh

from flops import matmul_flops
from timing import guarded, median_ms, ratio

sys.path.append(str(Path(__file__).resolve().parents[1] / 'tests'))  # the plain-autograd test oracle, kept in one place
from reference_isqrt import reference_newton_schulz_sqrt  # noqa: E402

MatrixFn = Callable[[torch.Tensor], torch.Tensor]
KEY_CONFIG = {'batch': 64, 'dim': 256, 'positions': 196}


def is_exact(name: str) -> bool:
    """Meta-layers whose forward is an exact eigendecomposition (the `SpectralPower` family)."""
    return isinstance(create_meta_layer(name), SpectralPower)


def random_covariance(batch: int, dim: int, positions: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return covariance(torch.randn(batch, dim, positions, device=device, dtype=dtype))


def saved_mib(fn: MatrixFn, cov: torch.Tensor) -> float:
    """MiB that one forward of `fn` keeps for its backward: the storages of autograd's saved tensors (custom Functions'
    included), each counted once, the input's excluded. What a training step holds per call, on any device."""
    leaf = cov.detach().clone().requires_grad_()
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() != leaf.untyped_storage().data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(leaf)
    return sum(storages.values()) / 2 ** 20


def time_forward_backward(fn: MatrixFn, cov: torch.Tensor, warmup: int, reps: int,
                          backward: bool = True) -> Dict[str, Optional[float]]:
    """{'fwd_ms', 'fwd_bwd_ms', 'saved_mib'} of `fn` on `cov` (`saved_mib`); the backward gets a random
    (non-symmetric) output gradient."""
    with torch.no_grad():
        fwd = median_ms(lambda: fn(cov), cov.device, warmup, reps)
    if not backward:
        return {'fwd_ms': fwd, 'fwd_bwd_ms': None, 'saved_mib': None}
    leaf = cov.detach().clone().requires_grad_()
    grad = torch.randn_like(cov)

    def step():
        leaf.grad = None
        fn(leaf).backward(grad)
    return {'fwd_ms': fwd, 'fwd_bwd_ms': median_ms(step, cov.device, warmup, reps), 'saved_mib': saved_mib(fn, cov)}


def product_gflop(fn: MatrixFn, cov: torch.Tensor) -> float:
    """GFLOP of the matrix products in one forward+backward of `fn` on `cov` (device-independent work)."""
    leaf = cov.detach().clone().requires_grad_()
    return matmul_flops(lambda: fn(leaf).backward(torch.randn_like(cov))) / 1e9


def time_with_products(fn: MatrixFn, cov: torch.Tensor, warmup: int, reps: int) -> Dict[str, Optional[float]]:
    """`time_forward_backward` plus 'fwd_bwd_gflop', the matrix-product work of one forward+backward."""
    return {**time_forward_backward(fn, cov, warmup, reps), 'fwd_bwd_gflop': product_gflop(fn, cov)}


def _with_ratios(rows: List[Dict[str, object]], baseline: Dict[str, object]) -> List[Dict[str, object]]:
    for row in rows:
        for key in ('fwd_ms', 'fwd_bwd_ms'):
            row[key.replace('_ms', '_vs_isqrt')] = ratio(row.get(key), baseline.get(key))
    return rows


def grid(names: Sequence[str], batches: Sequence[int], dims: Sequence[int], positions: Sequence[int],
         device: torch.device, warmup: int, reps: int) -> List[Dict[str, object]]:
    """Every meta-layer at every (B, d, M), with ratios to `isqrt` at the same (B, d, M)."""
    layers = {name: create_meta_layer(name).to(device) for name in names}
    rows = []
    for batch, dim, num_positions in itertools.product(batches, dims, positions):
        cov = random_covariance(batch, dim, num_positions, device)
        config_rows = []
        for name, layer in layers.items():
            row = {'meta_layer': name, 'batch': batch, 'dim': dim, 'positions': num_positions}
            row.update(guarded(lambda: time_forward_backward(layer, cov, warmup, reps)))
            config_rows.append(row)
        isqrt = next((r for r in config_rows if r['meta_layer'] == 'isqrt'), {})
        rows += _with_ratios(config_rows, isqrt)
    return rows


def riemannian_maps(device: torch.device, batches: Sequence[int], dims: Sequence[int], positions: Sequence[int],
                    warmup: int, reps: int) -> List[Dict[str, object]]:
    """Each RiemGCP map (`timm_gcp.layers.RiemannianMap`) after isqrt (θ = ½) at every (B, d, M), with ratios to
    isqrt alone ('pow_emlr', the map that changes nothing)."""
    root = create_meta_layer('isqrt').to(device)
    rows = []
    for batch, dim, num_positions in itertools.product(batches, dims, positions):
        cov = random_covariance(batch, dim, num_positions, device)
        rows += _measure_variants({
            f'isqrt + {name}': lambda m=RiemannianMap(name): time_forward_backward(
                lambda c: m(root(c), root.power), cov, warmup, reps)
            for name in RIEMANNIAN_MAPS}, batch, dim, num_positions)
    return rows


def _eigh_with(backend: str, dtype: torch.dtype) -> MatrixFn:
    return lambda a: eigh(a.to(dtype), backend)[1]


def key_config_baselines(names: Sequence[str], device: torch.device, eigh_backends: Sequence[str],
                         warmup: int, reps: int, batch: int, dim: int, positions: int) -> List[Dict[str, object]]:
    """At one (B, d, M): the fused isqrt against the plain-autograd reference, `eig` on each eigh backend,
    one float32 batched product and the raw eigendecompositions (forward only), all as ratios to the fused isqrt."""
    cov = random_covariance(batch, dim, positions, device)
    variants: Dict[str, Callable[[], Dict[str, Optional[float]]]] = {
        'isqrt (fused backward)': lambda: time_with_products(create_meta_layer('isqrt'), cov, warmup, reps),
        'isqrt (plain autograd reference)': lambda: time_with_products(reference_newton_schulz_sqrt, cov, warmup, reps),
        # the device's float32 batched-product speed, the unit every Newton-Schulz variant is made of
        'one batched product torch.bmm(A, A)': lambda: time_forward_backward(lambda a: torch.bmm(a, a), cov, warmup,
                                                                             reps, backward=False),
    }
    for backend in eigh_backends:
        backend_reps = 3 if backend == 'torch' else reps  # torch.linalg.eigh takes ~0.4 s per call on CUDA
        if 'eig' in names:
            variants[f'eig, eigh backend {backend}'] = (
                lambda b=backend, n=backend_reps: time_forward_backward(create_meta_layer('eig', eigh_backend=b), cov,
                                                                        1, n))
        for dtype in (torch.float32, torch.float64):
            label = f'eigh only, {backend}, {str(dtype).replace("torch.", "")}'
            variants[label] = lambda b=backend, t=dtype, n=backend_reps: time_forward_backward(
                _eigh_with(b, t), cov, 1, n, backward=False)
    return _measure_variants(variants, batch, dim, positions)


def _measure_variants(variants: Dict[str, Callable[[], Dict[str, Optional[float]]]], batch: int, dim: int,
                      positions: int) -> List[Dict[str, object]]:
    rows = [{'variant': label, 'batch': batch, 'dim': dim, 'positions': positions, **guarded(measure)}
            for label, measure in variants.items()]
    return _with_ratios(rows, rows[0])


def compiled_isqrt(device: torch.device, warmup: int, reps: int, batch: int, dim: int,
                   positions: int) -> List[Dict[str, object]]:
    """isqrt with `compile=True` (torch.compile, CUDA graphs) against the eager fused isqrt, same (B, d, M).
    Compilation happens in the warm-up."""
    cov = random_covariance(batch, dim, positions, device)
    eager, compiled = create_meta_layer('isqrt'), create_meta_layer('isqrt', compile=True)
    return _measure_variants({
        'isqrt (fused backward)': lambda: time_forward_backward(eager, cov, warmup, reps),
        'isqrt (compile=True, CUDA graphs)': lambda: time_forward_backward(compiled, cov, warmup + 3, reps),
    }, batch, dim, positions)
