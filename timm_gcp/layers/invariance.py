"""IDCCP's group invariance (Wang et al., IEEE TGRS 2021): the shared backbone sees every transform of the image
under a finite group of orthogonal transformations (D4: the 4 rotations by 90°, each with and without a flip), and the
head pools a representation that the group action leaves unchanged.

The representation is the pooling of the union of all transforms' feature positions: transforming the input permutes
the set of transformed inputs, hence the set of positions, which no pooling over positions (covariance, Gaussian
embedding, mean, max) can see. Choices and alternatives: docs/models.md."""
from typing import Dict, Tuple

import torch
from timm.layers import register_notrace_module
from torch import nn

from .stiefel import IDCCP_BIBTEX

__all__ = ['GROUPS', 'INVARIANCE_MODES', 'GroupInvariance', 'group_transforms']

GROUPS: Dict[str, Tuple[Tuple[int, bool], ...]] = {  # name -> its transforms as (quarter turns, then mirrored?)
    'flip': ((0, False), (0, True)),
    'c4': ((0, False), (1, False), (2, False), (3, False)),
    'd4': ((0, False), (1, False), (2, False), (3, False), (0, True), (1, True), (2, True), (3, True)),
}
INVARIANCE_MODES = ('train', 'test')


def group_transforms(x: torch.Tensor, group: str) -> torch.Tensor:
    """(B, C, H, W) images -> (|G|·B, C, H, W): every transform of `group` (`GROUPS`) applied to the batch, stacked
    transform-major (rows g·B to (g+1)·B - 1 hold transform g). Rotations need square images."""
    if group != 'flip' and x.shape[-1] != x.shape[-2]:
        raise ValueError(f'invariance={group!r} rotates images by 90°, so they must be square; got {x.shape[-2]} x '
                         f'{x.shape[-1]} px: crop or resize to a square (timm\'s eval transforms do), or use '
                         f'invariance="flip"')
    return torch.cat([(x.flip(-1) if mirrored else x).rot90(turns, (-2, -1)) for turns, mirrored in GROUPS[group]])


@register_notrace_module  # a leaf for torch.fx: its input check stays in the graph
class GroupInvariance(nn.Module):
    """Group invariance of a GCP model: `forward` stacks the images' transforms for the shared backbone,
    `union` folds their feature maps into one map per image for the head, `average` averages pooled features.

    mode 'train': every forward (training and inference) runs the |G| transforms and pools the union of their
    positions (IDCCP). mode 'test': training sees the images as given; inference averages the pooled features of the
    |G| transforms (test-time augmentation: |G| backbone passes at inference only).
    """
    papers = (IDCCP_BIBTEX,)

    def __init__(self, group: str, mode: str = 'train'):
        super().__init__()
        if group not in GROUPS:
            raise ValueError(f'invariance must be one of {", ".join(map(repr, GROUPS))} or None, got {group!r}')
        if mode not in INVARIANCE_MODES:
            raise ValueError(f'invariance_mode must be one of {", ".join(map(repr, INVARIANCE_MODES))}, got {mode!r}')
        self.group, self.mode = group, mode

    @property
    def size(self) -> int:
        """|G|, the backbone passes per image while `active`."""
        return len(GROUPS[self.group])

    @property
    def active(self) -> bool:
        """Whether the model runs the transforms now (mode 'test': in eval mode only)."""
        return self.mode == 'train' or not self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_transforms(x, self.group) if self.active else x

    def union(self, maps: torch.Tensor) -> torch.Tensor:
        """(|G|·B, C, h, w) stacked feature maps -> (B, C, |G|·h, w): each image's maps side by side, one map of all
        their positions."""
        return maps.unflatten(0, (self.size, -1)).permute(1, 2, 0, 3, 4).flatten(2, 3)

    def average(self, pooled: torch.Tensor) -> torch.Tensor:
        """(|G|·B, F) pooled features of the stacked transforms -> (B, F) their mean per image."""
        return pooled.unflatten(0, (self.size, -1)).mean(0)

    def extra_repr(self) -> str:
        return f'group={self.group!r}, mode={self.mode!r}'
