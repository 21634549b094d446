"""GSoP-Net: GCP ResNets with GSoP blocks inside the backbone.

Gao et al., "Global Second-order Pooling Convolutional Networks", CVPR 2019 (arXiv:1811.12006).
GSoP-Net2 (default, `gsop_net=2`): GSoP blocks in the last bottleneck of stages 1-3, iSQRT-COV head (3 iterations).
GSoP-Net1 (`gsop_net=1`): GSoP blocks in the last bottleneck of all four stages, global average pooling head.
"""
from typing import Any, Dict, Optional, Tuple, Type

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck

from ..layers import GSoPBlock
from ._pretrained import GSOP_PAPER, ISQRT_COV_PAPER, backbone_tags, build_gcp_model
from .gcp_resnet import GcpResNet, stride16_cfg

__all__ = ['GSoPResNet']

_GSOP_STAGES = {1: (1, 2, 3, 4), 2: (1, 2, 3)}


class GSoPResNet(GcpResNet):
    """GCP ResNet with a GSoP block in the last block of each chosen stage (stride 2 in stage 1's reduction)."""

    def __init__(
            self,
            block: Type[Bottleneck],
            layers: Tuple[int, ...],
            gsop_net: int = 2,
            gsop_dim: int = 128,
            global_pool: Optional[str] = None,
            meta_layer: str = 'isqrt',
            meta_layer_kwargs: Optional[Dict[str, Any]] = None,
            **kwargs,
    ):
        """
        Args:
            gsop_net: 2 = GSoP blocks after stages 1-3 + GCP head; 1 = blocks after stages 1-4 + average pooling.
            gsop_dim: channels of each GSoP block's covariance (128 in the paper).
            global_pool: None = the head of `gsop_net` ('gcp' or 'avg'); any GcpResNet pooling otherwise.
        """
        if gsop_net not in _GSOP_STAGES:
            raise ValueError(f'gsop_net must be 1 (GSoP-Net1) or 2 (GSoP-Net2), got {gsop_net!r}')
        if global_pool is None:
            global_pool = 'gcp' if gsop_net == 2 else 'avg'
        if meta_layer == 'isqrt' and meta_layer_kwargs is None:
            meta_layer_kwargs = {'num_iter': 3}
        super().__init__(
            block, layers, global_pool=global_pool, meta_layer=meta_layer, meta_layer_kwargs=meta_layer_kwargs,
            **kwargs)
        self.gsop_net = gsop_net
        self.gsop_dim = gsop_dim
        for stage_idx in _GSOP_STAGES[gsop_net]:
            last_block = getattr(self, f'layer{stage_idx}')[-1]
            channels = self.feature_info[stage_idx]['num_chs']
            gsop = GSoPBlock(channels, gsop_dim, stride=2 if stage_idx == 1 else 1)
            last_block.se = self._like_backbone(gsop)

    def gcp_model_args(self) -> Dict[str, Any]:
        return dict(super().gcp_model_args(), gsop_net=self.gsop_net, gsop_dim=self.gsop_dim)


_DESCRIPTION = 'GSoP-Net (GSoP blocks after stages 1-3, iSQRT-COV head with 3 iterations, layer4 stride 1)'
_PAPER = 'Global Second-order Pooling Convolutional Networks'
_ARCHS = {
    'gsop_resnet50': (3, 4, 6, 3),
    'gsop_resnet101': (3, 4, 23, 3),
}

default_cfgs = generate_default_cfgs({
    name: cfg
    for arch in _ARCHS
    for name, cfg in backbone_tags(
        arch, arch.replace('gsop_', ''), _DESCRIPTION, (GSOP_PAPER, ISQRT_COV_PAPER), stride16_cfg(_PAPER)).items()
})


def _create_gsop_resnet(variant: str, pretrained: bool = False, **kwargs) -> GSoPResNet:
    return build_gcp_model(GSoPResNet, variant, pretrained, block=Bottleneck, layers=_ARCHS[variant], **kwargs)


@register_model
def gsop_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2 ResNet-50 (`gsop_net=1`: GSoP-Net1)."""
    return _create_gsop_resnet('gsop_resnet50', pretrained, **kwargs)


@register_model
def gsop_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2 ResNet-101 (`gsop_net=1`: GSoP-Net1)."""
    return _create_gsop_resnet('gsop_resnet101', pretrained, **kwargs)
