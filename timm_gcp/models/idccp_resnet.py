"""IDCCP ResNets: GCP ResNets invariant to the dihedral group D4 with an orthonormally compressed covariance.

Wang et al., "Invariant Deep Compressible Covariance Pooling for Aerial Scene Categorization", IEEE TGRS 2021
(arXiv:2011.05702). The shared backbone sees the 8 D4 transforms of each image; the head pools the union of their
feature positions (invariant to the group), compresses the 256 x 256 covariance to 36 x 36 by WᵀΣW with orthonormal W
(32,896 -> 666 features, -98 %), normalises it (iSQRT-COV) and classifies. Any GCP model takes the same options as
kwargs (`invariance`, `compress_dim`); these names set them by default. Construction and choices: docs/models.md.
"""
from typing import Any, Dict

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck

from ._pretrained import IDCCP_PAPER, ISQRT_COV_PAPER, backbone_tags, build_gcp_model
from .gcp_resnet import GcpResNet, stride16_cfg

__all__ = ['IDCCP_DEFAULTS']

IDCCP_DEFAULTS: Dict[str, Any] = dict(invariance='d4', compress_dim=36)
"""The model kwargs the idccp_* names default to (any may be overridden)."""

_DESCRIPTION = ('IDCCP ResNet (GCP ResNet, D4-invariant union of the transforms\' positions, covariance compressed to '
                '36 x 36 by an orthonormal W, iSQRT-COV, 8 backbone passes per image)')
_PAPER = 'Invariant Deep Compressible Covariance Pooling for Aerial Scene Categorization'
_ARCHS = {
    'idccp_resnet18': (BasicBlock, (2, 2, 2, 2)),
    'idccp_resnet34': (BasicBlock, (3, 4, 6, 3)),
    'idccp_resnet50': (Bottleneck, (3, 4, 6, 3)),
    'idccp_resnet101': (Bottleneck, (3, 4, 23, 3)),
    'idccp_resnet152': (Bottleneck, (3, 8, 36, 3)),
}

default_cfgs = generate_default_cfgs({
    name: cfg
    for arch in _ARCHS
    for name, cfg in backbone_tags(
        arch, arch[len('idccp_'):], _DESCRIPTION, (IDCCP_PAPER, ISQRT_COV_PAPER), stride16_cfg(_PAPER)).items()
})


def _create_idccp_resnet(variant: str, pretrained: bool = False, **kwargs) -> GcpResNet:
    block, layers = _ARCHS[variant]
    return build_gcp_model(GcpResNet, variant, pretrained, block=block, layers=layers, **{**IDCCP_DEFAULTS, **kwargs})


@register_model
def idccp_resnet18(pretrained: bool = False, **kwargs) -> GcpResNet:
    """IDCCP ResNet-18: D4 invariance, 512 -> 256 reduction, covariance compressed to 36 x 36, iSQRT-COV."""
    return _create_idccp_resnet('idccp_resnet18', pretrained, **kwargs)


@register_model
def idccp_resnet34(pretrained: bool = False, **kwargs) -> GcpResNet:
    """IDCCP ResNet-34: D4 invariance, 512 -> 256 reduction, covariance compressed to 36 x 36, iSQRT-COV."""
    return _create_idccp_resnet('idccp_resnet34', pretrained, **kwargs)


@register_model
def idccp_resnet50(pretrained: bool = False, **kwargs) -> GcpResNet:
    """IDCCP ResNet-50: D4 invariance, 2048 -> 256 reduction, covariance compressed to 36 x 36, iSQRT-COV."""
    return _create_idccp_resnet('idccp_resnet50', pretrained, **kwargs)


@register_model
def idccp_resnet101(pretrained: bool = False, **kwargs) -> GcpResNet:
    """IDCCP ResNet-101: D4 invariance, 2048 -> 256 reduction, covariance compressed to 36 x 36, iSQRT-COV."""
    return _create_idccp_resnet('idccp_resnet101', pretrained, **kwargs)


@register_model
def idccp_resnet152(pretrained: bool = False, **kwargs) -> GcpResNet:
    """IDCCP ResNet-152: D4 invariance, 2048 -> 256 reduction, covariance compressed to 36 x 36, iSQRT-COV."""
    return _create_idccp_resnet('idccp_resnet152', pretrained, **kwargs)
