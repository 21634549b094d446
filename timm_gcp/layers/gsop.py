"""GSoP block: channel attention from a global second-order (covariance) statistic (Gao et al., CVPR 2019)."""
import torch
from torch import nn

from ..ops import covariance, refuse_torchscript

__all__ = ['GSoPBlock']


GSOP_BIBTEX = """@inproceedings{gao2019global,
  title={Global Second-order Pooling Convolutional Networks},
  author={Gao, Zilin and Xie, Jiangtao and Wang, Qilong and Li, Peihua},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2019}
}"""

class GSoPBlock(nn.Module):
    """(B, C, H, W) -> the same features scaled channel-wise by a gate computed from their covariance.

    ReLU -> 1x1 conv C->dim (stride `stride`) + BN + ReLU -> dim x dim covariance (float32) -> BN over rows ->
    row-wise conv (groups=dim, kernel dim x 1, `expansion` x dim channels) -> 1x1 conv -> sigmoid -> scale.
    It sits in a residual block where a squeeze-excitation would: on the block output, before the residual add.
    `torch.jit.script` raises a RuntimeError (use torch.compile).
    """
    __prepare_scriptable__ = refuse_torchscript
    papers = (GSOP_BIBTEX,)  # BibTeX, cited by model cards (as MetaLayer.papers)

    def __init__(self, channels: int, dim: int = 128, stride: int = 1, expansion: int = 4):
        super().__init__()
        if dim < 1 or channels < 1:
            raise ValueError(f'GSoPBlock needs positive channels and dim, got channels={channels}, dim={dim}')
        self.dim = dim
        self.act_in = nn.ReLU()  # not in-place: the block output it reads is scaled afterwards
        self.conv_reduce = nn.Conv2d(channels, dim, kernel_size=1, stride=stride, bias=False)
        self.bn_reduce = nn.BatchNorm2d(dim)
        self.act_reduce = nn.ReLU(inplace=True)
        self.bn_cov = nn.BatchNorm2d(dim)
        self.row_conv = nn.Conv2d(dim, expansion * dim, kernel_size=(dim, 1), groups=dim)
        self.conv_expand = nn.Conv2d(expansion * dim, channels, kernel_size=1)
        self.gate = nn.Sigmoid()
        for conv in (self.conv_reduce, self.row_conv, self.conv_expand):
            nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 1, 1) channel gate in (0, 1)."""
        reduced = self.act_reduce(self.bn_reduce(self.conv_reduce(self.act_in(x))))
        cov = covariance(reduced).unsqueeze(-1)  # (B, dim, dim, 1): rows as channels
        cov = self.bn_cov(cov.to(self.bn_cov.weight.dtype))
        return self.gate(self.conv_expand(self.row_conv(cov)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x).to(x.dtype)
