"""Test oracle: the iSQRT-COV Newton-Schulz square root as written in the paper (Li et al., CVPR 2018), differentiated
by plain autograd. `timm_gcp.meta_layers.newton_schulz_sqrt` (fused forward, hand-derived backward) must compute its
numbers; the benchmark's "plain autograd reference" row times it (benchmarks/meta_layer_bench.py imports it from here,
so there is one copy)."""
import torch


def reference_newton_schulz_sqrt(cov: torch.Tensor, num_iter: int = 5) -> torch.Tensor:
    """(B, d, d) -> (B, d, d): Y_0 = sym(Σ)/tr Σ, Z_0 = I; T = ½(3I − Z Y), Y ← Y T, Z ← T Z for `num_iter` − 1
    steps; a last half step Y T; times √tr Σ. The trace is floored at √(smallest normal) so Σ = 0 stays finite."""
    eye3 = 3.0 * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(cov.dtype).tiny ** 0.5)[:, None, None]
    y = 0.5 * (cov + cov.mT) / trace
    z = None  # Z_0 = I, never multiplied
    for _ in range(num_iter - 1):
        t = 0.5 * (eye3 - (y if z is None else z @ y))
        y, z = y @ t, (t if z is None else t @ z)
    return y @ (0.5 * (eye3 - (y if z is None else z @ y))) * trace.sqrt()
