"""Compact covariance heads of the MPN-COV journal version (Wang et al., TPAMI 2021): a progressive chain of 1x1
reductions before the covariance, and a row-wise group convolution that compresses the normalised covariance.

The paper's body could not be read; the constructions are this library's choices, documented in docs/models.md."""
from typing import Any, Sequence, Tuple

import torch
from timm.layers import ConvNormAct
from torch import nn

from ..ops import check_square_batch, compute_dtype, fp32_island
from .gaussian import MPN_COV_TPAMI_BIBTEX

__all__ = ['ProgressiveReduction', 'RowGroupConv', 'check_widths']


def check_widths(widths: Any) -> Tuple[int, ...]:
    """`widths` as a tuple if it is a non-empty list or tuple of positive ints, else ValueError."""
    valid = isinstance(widths, (list, tuple)) and len(widths) > 0 and all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    if not valid:
        raise ValueError(f'progressive_widths must be a non-empty list of positive int channel counts (the widths of '
                         f'the 1x1 conv-BN-ReLU stages before the final reduction, e.g. [1024, 512]), got {widths!r}')
    return tuple(widths)


class ProgressiveReduction(nn.Sequential):
    """(B, in_chs, H, W) -> (B, widths[-1], H, W): one 1x1 conv-BN-ReLU stage per width, in order (the MPN-COV journal
    version's progressive 1x1 convolutions; the GCP head's own reduction to its dimension follows)."""
    papers = (MPN_COV_TPAMI_BIBTEX,)

    def __init__(self, in_chs: int, widths: Sequence[int]):
        widths = check_widths(widths)
        super().__init__(*(ConvNormAct(c_in, c_out, kernel_size=1, bias=False)
                           for c_in, c_out in zip((in_chs,) + widths[:-1], widths)))
        for stage in self:
            nn.init.kaiming_normal_(stage.conv.weight, mode='fan_out', nonlinearity='relu')


class RowGroupConv(nn.Module):
    """(B, n, n) normalised covariance -> (B, n * per_row) compact representation: a group convolution with one group
    per row, as GSoP's row-wise convolution: row i is a channel of length n, convolved by its own `per_row` filters
    of length n (`nn.Conv1d(n, n * per_row, kernel_size=n, groups=n)`, and initialised as it is).

    Computed as the batched product it is (CPU grouped convolutions are several times slower); in float32 (float64
    for float64 input) with autocast disabled, like the meta-layer before it."""
    papers = (MPN_COV_TPAMI_BIBTEX,)

    def __init__(self, size: int, per_row: int):
        super().__init__()
        if isinstance(per_row, bool) or not isinstance(per_row, int) or per_row < 1:
            raise ValueError(f'group_conv must be a positive int (filters per covariance row), got {per_row!r}')
        self.size, self.per_row = size, per_row
        bound = size ** -0.5
        self.weight = nn.Parameter(torch.empty(size, per_row, size).uniform_(-bound, bound))  # (row, filter, column)
        self.bias = nn.Parameter(torch.empty(size, per_row).uniform_(-bound, bound))

    @property
    def out_features(self) -> int:
        return self.size * self.per_row

    def forward(self, matrix: torch.Tensor) -> torch.Tensor:
        check_square_batch(matrix, 'RowGroupConv input')
        with fp32_island(matrix):
            dtype = compute_dtype(matrix)
            rows = matrix.to(dtype).transpose(0, 1)  # (n, B, n): a batch of rows per covariance row index
            out = torch.bmm(rows, self.weight.to(dtype).transpose(1, 2)) + self.bias.to(dtype)[:, None]
        return out.transpose(0, 1).flatten(1)  # (B, n * per_row), filters of row i at i * per_row ...

    def extra_repr(self) -> str:
        return f'size={self.size}, per_row={self.per_row}'
