"""iSQRT-COV: matrix square root by coupled Newton-Schulz iteration (Li et al., CVPR 2018)."""
import torch

from .registry import MetaLayer, register_meta_layer

__all__ = ['ISqrt', 'newton_schulz_sqrt']


def newton_schulz_sqrt(cov: torch.Tensor, num_iter: int = 5) -> torch.Tensor:
    """Approximate square root of (B, d, d) SPD matrices: trace pre-normalisation, `num_iter` coupled
    Newton-Schulz steps (the last one updates Y only), √trace post-compensation."""
    if num_iter < 1:
        raise ValueError(f'num_iter must be >= 1, got {num_iter}')
    d = cov.shape[-1]
    eye3 = 3.0 * torch.eye(d, dtype=cov.dtype, device=cov.device)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(cov.dtype).tiny ** 0.5)[:, None, None]
    y = cov / trace
    z = None
    for _ in range(num_iter - 1):
        t = 0.5 * (eye3 - (y if z is None else z @ y))
        y, z = y @ t, (t if z is None else t @ z)
    t = 0.5 * (eye3 - (y if z is None else z @ y))
    return (y @ t) * trace.sqrt()


@register_meta_layer('isqrt')
class ISqrt(MetaLayer):
    """iSQRT-COV Newton-Schulz square root; `num_iter=5` in ResNets, 3 in the GSoP-Net2 head."""

    def __init__(self, num_iter: int = 5):
        super().__init__()
        if num_iter < 1:
            raise ValueError(f'isqrt needs num_iter >= 1, got {num_iter}')
        self.num_iter = num_iter

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        return newton_schulz_sqrt(cov, self.num_iter)

    def extra_repr(self) -> str:
        return f'num_iter={self.num_iter}'
