"""GCP ResNets (iSQRT-COV architecture): timm ResNets with layer4 at stride 1 and a global covariance pooling head.

Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root
Normalization", CVPR 2018 (arXiv:1712.01034).
"""
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from timm.models import PretrainedCfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..layers import GCPPool
from ._backbone import _check_complete, backbone_filter_fn, pretrained_source
from ._head import GcpHeadMixin
from ._pretrained import ISQRT_COV_PAPER, backbone_tags, build_gcp_model

__all__ = ['GcpResNet']


def _remove_stride(stage: nn.Sequential) -> None:
    """Run a ResNet stage at stride 1 without dilation: its first block's strided convs become stride 1."""
    for module in stage[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)


class GcpResNet(GcpHeadMixin, ResNet):
    """timm ResNet whose `global_pool` is a GCP module (1x1 reduction, covariance, meta-layer, triu) and whose `fc`
    classifies the d(d+1)/2 second-order features. `num_features` stays the backbone width; `head_hidden_size` is the
    width of the pooled features. `global_pool` may also be any timm pool type ('avg', '', ...)."""

    def __init__(
            self,
            block: Union[Type[BasicBlock], Type[Bottleneck]],
            layers: Tuple[int, ...],
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'gcp',
            gcp_dim: int = 256,
            meta_layer: str = 'isqrt',
            meta_layer_kwargs: Optional[Dict[str, Any]] = None,
            layer4_stride: int = 1,
            **kwargs,
    ):
        """
        Args:
            gcp_dim: channels of the 1x1 reduction before the covariance (at most the backbone channels).
            meta_layer: matrix normalisation of the covariance, a name from `timm_gcp.list_meta_layers()`.
            meta_layer_kwargs: options of the meta-layer (e.g. {'num_iter': 5} for 'isqrt').
            layer4_stride: 1 (the GCP architecture: 14x14 maps at 224 px, no dilation) or 2 (a plain ResNet's).
            **kwargs: the GCP head's options (`timm_gcp.layers.HEAD_OPTIONS`, e.g. dropcov=True: DropCov's adaptive
                channel dropout, for meta_layer='cov'; gaussian=True; compress_dim=36), the group invariance
                (invariance='d4', invariance_mode='train'), then timm ResNet options (drop_rate, drop_path_rate, ...).
        """
        if layer4_stride not in (1, 2):
            raise ValueError(f'layer4_stride must be 1 (GCP architecture) or 2 (plain ResNet), got {layer4_stride!r}')
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError('GCP ResNets set the stride of layer4 with layer4_stride, not output_stride')
        head_options = self.pop_head_options(kwargs, global_pool)
        group_invariance = self.pop_invariance(kwargs)
        super().__init__(block, layers, num_classes=0, in_chans=in_chans, global_pool='avg', **kwargs)
        self.group_invariance = group_invariance
        self.set_gcp_dim(gcp_dim)
        self.layer4_stride = layer4_stride
        if layer4_stride == 1:
            _remove_stride(self.layer4)
            self.feature_info[-1]['reduction'] = self.feature_info[-2]['reduction']
        self.head_options = head_options
        self.set_meta_layer(meta_layer, **(meta_layer_kwargs or {}))  # validated even without a GCP head
        self.reset_classifier(num_classes, global_pool)

    def gcp_model_args(self) -> Dict[str, Any]:
        return dict(super().gcp_model_args(), layer4_stride=self.layer4_stride)

    def transformed(self, x: torch.Tensor) -> torch.Tensor:
        """Checked images, stacked with their transforms when group invariance is active."""
        x = _check_images(x, self.in_chans, type(self).__name__)
        return x if self.group_invariance is None else self.group_invariance(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map; with group invariance, that of each transform, stacked transform-major."""
        return super().forward_features(self.transformed(x))

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm ResNet's, on the images as `forward_features` sees them (stacked transforms with group invariance)."""
        return super().forward_intermediates(self.transformed(x), *args, **kwargs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if isinstance(self.global_pool, GCPPool):
            x = _check_feature_map(x, self.feature_info[-1]['reduction'])
        x = self.pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)


def _check_images(x: torch.Tensor, in_chans: int, name: str) -> torch.Tensor:
    """`x`, or ValueError unless it is a (B, in_chans, H, W) batch (one opaque call in a torch.fx graph)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f'{name} expects images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}')
    return x


def _check_feature_map(x: torch.Tensor, reduction: int) -> torch.Tensor:
    """`x`, or ValueError when the final map has fewer than 2 positions (one opaque call in a torch.fx graph)."""
    if x.shape[-1] * x.shape[-2] < 2:
        raise ValueError(
            f'covariance pooling needs a feature map of at least 2 positions, got {tuple(x.shape[-2:])}: this '
            f'network downsamples by {reduction}, so inputs must be larger than {reduction}x{reduction} px')
    return x


torch.fx.wrap('_check_images')  # traced as calls whose output is used: checked when any traced graph runs
torch.fx.wrap('_check_feature_map')


_DESCRIPTION = 'GCP ResNet (iSQRT-COV: layer4 stride 1, 1x1 reduction to 256, covariance, meta-layer, triu, FC)'
_PAPER = 'Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root Normalization'
_ARCHS = {
    'gcp_resnet18': (BasicBlock, (2, 2, 2, 2)),
    'gcp_resnet34': (BasicBlock, (3, 4, 6, 3)),
    'gcp_resnet50': (Bottleneck, (3, 4, 6, 3)),
    'gcp_resnet101': (Bottleneck, (3, 4, 23, 3)),
    'gcp_resnet152': (Bottleneck, (3, 8, 36, 3)),
}


def stride16_cfg(paper_name: str) -> Callable[[PretrainedCfg], Dict[str, Any]]:
    """`backbone_tags` adapter for GCP ResNets: pool sizes at stride 16, the GCP paper's name."""
    def adapt(cfg: PretrainedCfg) -> Dict[str, Any]:
        return dict(pool_size=_pool_size(cfg.input_size), test_pool_size=_pool_size(cfg.test_input_size),
                    paper_name=paper_name)
    return adapt


def _pool_size(input_size: Optional[Tuple[int, int, int]]) -> Optional[Tuple[int, int]]:
    return tuple(s // 16 for s in input_size[1:]) if input_size else None


default_cfgs = generate_default_cfgs({
    name: cfg
    for arch in _ARCHS
    for name, cfg in backbone_tags(
        arch, arch[len('gcp_'):], _DESCRIPTION, (ISQRT_COV_PAPER,), stride16_cfg(_PAPER)).items()
})


_OFFICIAL_PREFIXES = {  # the official models' names -> ours (the GCP head is `global_pool`)
    'layer_reduce.': 'global_pool.conv.', 'layer_reduce_bn.': 'global_pool.bn.',
    'representation.conv_dr_block.0.': 'global_pool.conv.', 'representation.conv_dr_block.1.': 'global_pool.bn.',
    'classifier.': 'fc.', 'features.0.': 'conv1.', 'features.1.': 'bn1.', 'features.4.': 'layer1.',
    'features.5.': 'layer2.', 'features.6.': 'layer3.', 'features.7.': 'layer4.',
}


def official_layout(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The layout of an official GCP ResNet checkpoint, from its head's and classifier's keys: 'mpncovresnet'
    (fast-MPN-COV's model zoo), 'newmodel' (the `features` / `representation` / `classifier` model of its training
    script, also DifferentiableSVD's), or None for any other checkpoint."""
    if state_dict.keys() >= {'layer_reduce.weight', 'fc.weight'}:
        return 'mpncovresnet'
    return 'newmodel' if state_dict.keys() >= {'representation.conv_dr_block.0.weight', 'classifier.weight'} else None


def remap_official(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official checkpoint's tensors under GcpResNet's names; a DataParallel `features.module.` counts as
    `features.`, and keys with no official counterpart stay as they are."""
    remapped = {}
    for key, value in state_dict.items():
        key = key.replace('features.module.', 'features.', 1)
        old = next((p for p in _OFFICIAL_PREFIXES if key.startswith(p)), '')
        remapped[_OFFICIAL_PREFIXES.get(old, '') + key[len(old):]] = value
    return remapped


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: GcpResNet) -> Dict[str, torch.Tensor]:
    """timm `pretrained_filter_fn` of GCP ResNets: an official checkpoint (`official_layout`), e.g. from
    `pretrained_cfg_overlay=dict(file='mpncovresnet50.pth')`, is renamed and must fit the model (ValueError naming
    missing, unexpected and misshapen keys); timm backbones and exports go to `backbone_filter_fn`."""
    layout = official_layout(state_dict)
    if layout is None:
        return backbone_filter_fn(state_dict, model)
    state_dict = remap_official(state_dict)
    _check_complete(model.state_dict(), state_dict, pretrained_source(model), model, f'a {layout}-layout checkpoint')
    return state_dict


def _create_gcp_resnet(variant: str, pretrained: bool = False, **kwargs) -> GcpResNet:
    block, layers = _ARCHS[variant]
    return build_gcp_model(GcpResNet, variant, pretrained, checkpoint_filter_fn, block=block, layers=layers, **kwargs)


@register_model
def gcp_resnet18(pretrained: bool = False, **kwargs) -> GcpResNet:
    """GCP ResNet-18: BasicBlocks (2, 2, 2, 2), 512 -> 256 reduction, iSQRT-COV head."""
    return _create_gcp_resnet('gcp_resnet18', pretrained, **kwargs)


@register_model
def gcp_resnet34(pretrained: bool = False, **kwargs) -> GcpResNet:
    """GCP ResNet-34: BasicBlocks (3, 4, 6, 3), 512 -> 256 reduction, iSQRT-COV head."""
    return _create_gcp_resnet('gcp_resnet34', pretrained, **kwargs)


@register_model
def gcp_resnet50(pretrained: bool = False, **kwargs) -> GcpResNet:
    """GCP ResNet-50: Bottlenecks (3, 4, 6, 3), 2048 -> 256 reduction, iSQRT-COV head."""
    return _create_gcp_resnet('gcp_resnet50', pretrained, **kwargs)


@register_model
def gcp_resnet101(pretrained: bool = False, **kwargs) -> GcpResNet:
    """GCP ResNet-101: Bottlenecks (3, 4, 23, 3), 2048 -> 256 reduction, iSQRT-COV head."""
    return _create_gcp_resnet('gcp_resnet101', pretrained, **kwargs)


@register_model
def gcp_resnet152(pretrained: bool = False, **kwargs) -> GcpResNet:
    """GCP ResNet-152: Bottlenecks (3, 8, 36, 3), 2048 -> 256 reduction, iSQRT-COV head."""
    return _create_gcp_resnet('gcp_resnet152', pretrained, **kwargs)
