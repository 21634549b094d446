"""IDCCP's compression of the covariance by an orthonormal projection: WᵀΣW with W on the Stiefel manifold (Wang et
al., "Invariant Deep Compressible Covariance Pooling for Aerial Scene Categorization", IEEE TGRS 2021)."""
import torch
from torch import nn

from ..ops import check_square_batch, compute_dtype, fp32_island

__all__ = ['StiefelCompression', 'orthonormal_columns']


IDCCP_BIBTEX = """@article{wang2021invariant,
  title={Invariant Deep Compressible Covariance Pooling for Aerial Scene Categorization},
  author={Wang, Shidong and Ren, Yi and Parr, Gerard and Guan, Yu and Shao, Ling},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  volume={59},
  number={8},
  pages={6549--6561},
  year={2021}
}"""


def orthonormal_columns(factor: torch.Tensor) -> torch.Tensor:
    """(n, k) full-rank `factor`, k <= n -> the (n, k) matrix W with WᵀW = I spanning its columns: the Q factor of its
    QR decomposition with the signs that make R's diagonal positive (unique, differentiable, unchanged by scaling
    `factor`). Float32 for low-precision input."""
    q, r = torch.linalg.qr(factor.to(compute_dtype(factor)))
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)


class StiefelCompression(nn.Module):
    """(B, n, n) covariance -> (B, k, k) WᵀΣW, W (n x k) with orthonormal columns (IDCCP's orthogonal constraint).

    W is `orthonormal_columns(factor)` of the free parameter `factor`, recomputed each forward, so it stays
    orthonormal to float rounding whatever step any optimiser takes (weight decay only rescales `factor`, which leaves
    W unchanged). Computes in float32 (float64 for float64 input) with autocast disabled.
    """
    papers = (IDCCP_BIBTEX,)

    def __init__(self, size: int, dim: int):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= size:
            raise ValueError(f'compress_dim must be an int from 1 to {size} (the size of the pooled matrix: gcp_dim, '
                             f'+1 with gaussian=True), got {dim!r}')
        self.size, self.dim = size, dim
        self.factor = nn.Parameter(torch.empty(size, dim))
        nn.init.orthogonal_(self.factor)

    @property
    def weight(self) -> torch.Tensor:
        """W, (size, dim), orthonormal columns."""
        return orthonormal_columns(self.factor)

    def forward(self, cov: torch.Tensor) -> torch.Tensor:
        check_square_batch(cov, 'StiefelCompression input')
        if cov.shape[-1] != self.size:
            raise ValueError(f'StiefelCompression expects {self.size} x {self.size} matrices, got {tuple(cov.shape)}')
        with fp32_island(cov):
            w = self.weight.to(compute_dtype(cov))
            return w.transpose(0, 1) @ cov.to(w.dtype) @ w

    def extra_repr(self) -> str:
        return f'size={self.size}, dim={self.dim}'
