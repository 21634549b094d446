"""A GCP head on any timm architecture of the families in `FAMILIES`: `gcp_<timm name>` for each, with every timm
pretrained tag of the base architecture (its backbone weights; the GCP head starts fresh).

The base model is built headless (`num_classes=0`, no pooling, no head parameters) as `backbone`; the GCP head
pools its `forward_features` output: NCHW maps as they are, NHWC maps permuted, transformer tokens without their
class/register tokens as a (B, C, N, 1) map.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.models import (
    convnext, deit, generate_default_cfgs, register_model, swin_transformer, vision_transformer)
from torch import nn

from ..layers import HEAD_OPTIONS
from ._head import GcpHeadMixin
from ._pretrained import ISQRT_COV_PAPER, backbone_tags, build_gcp_model, resolve_tag

__all__ = ['Family', 'FAMILIES', 'GcpNet']


@dataclass(frozen=True)
class Family:
    """How a GCP head goes on the architectures of one timm model module."""
    output_fmt: str = 'NCHW'  # layout of the base's forward_features: 'NCHW', 'NHWC' or 'NLC' (tokens)
    base_kwargs: Dict[str, Any] = field(default_factory=dict)  # build options that keep head parameters away
    renames: Tuple[Tuple[str, str], ...] = ()  # checkpoint prefix -> prefix in the headless base
    head: Tuple[str, ...] = ('head.',)  # checkpoint prefixes of the base's head, dropped on loading
    filter_fn: Optional[Callable] = None  # the timm module's own checkpoint conversion, applied first
    exclude: Tuple[str, ...] = ()  # architectures (fnmatch patterns) whose headless build gives no features to pool


FAMILIES: Dict[str, Family] = {
    # ConvNeXt's final norm (and MLP) sit in its head: the norm is built before the pooling instead, as `norm_pre`
    'convnext': Family(base_kwargs=dict(head_norm_first=True, head_hidden_size=0),
                       renames=(('head.norm.', 'norm_pre.'),), filter_fn=convnext.checkpoint_filter_fn),
    'efficientnet': Family(head=('classifier.',)),
    'regnet': Family(),
    'resnet': Family(head=('fc.',)),
    'resnetv2': Family(),
    # ViTs pooled by averaging normalise in the head (`fc_norm`): moved to the final `norm`; attention pools dropped
    'vision_transformer': Family('NLC', dict(fc_norm=False), renames=(('fc_norm.', 'norm.'),),
                                 head=('head.', 'attn_pool.'), filter_fn=vision_transformer.checkpoint_filter_fn),
    # distilled DeiTs only build with their two-token head, which pools the class and distillation tokens
    'deit': Family('NLC', dict(fc_norm=False), renames=(('fc_norm.', 'norm.'),), head=('head.', 'head_dist.'),
                   filter_fn=deit.checkpoint_filter_fn, exclude=('*distilled*',)),
    'swin_transformer': Family('NHWC', filter_fn=swin_transformer.checkpoint_filter_fn),
}
"""timm module name -> Family. Adding a family is one entry here."""

_GCP_ONLY = ('global_pool.', 'fc.')


class GcpNet(GcpHeadMixin, nn.Module):
    """timm `base_arch` without its head (`backbone`) under a GCP head: `global_pool` (1x1 reduction to `gcp_dim`,
    covariance, meta-layer, triu), dropout and `fc`. `num_features` is the backbone width, `head_hidden_size` the
    width of the pooled features; `global_pool` may also be any timm pool type ('avg', '' for none)."""

    def __init__(
            self,
            base_arch: str,
            family: Family,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'gcp',
            gcp_dim: Optional[int] = None,
            meta_layer: str = 'isqrt',
            meta_layer_kwargs: Optional[Dict[str, Any]] = None,
            drop_rate: float = 0.,
            **kwargs,
    ):
        """
        Args:
            base_arch: the timm architecture under the head; `family` says how to build and load it.
            gcp_dim: channels of the 1x1 reduction before the covariance (default: 256 or the backbone width if
                smaller; at most the backbone width).
            meta_layer: matrix normalisation of the covariance, a name from `timm_gcp.list_meta_layers()`.
            meta_layer_kwargs: options of the meta-layer (e.g. {'num_iter': 5} for 'isqrt').
            drop_rate: dropout before `fc`.
            **kwargs: the GCP head's options (`timm_gcp.layers.HEAD_OPTIONS`, e.g. dropcov=True: DropCov's adaptive
                channel dropout; gaussian=True; compress_dim=36), the group invariance (invariance='d4',
                invariance_mode='train'), then options of the base architecture (drop_path_rate, img_size, ...).
        """
        super().__init__()
        self.base_arch = base_arch
        self.family = family
        self.head_options = self.pop_head_options(kwargs, global_pool)
        self.group_invariance = self.pop_invariance(kwargs)
        self.output_fmt = family.output_fmt  # the layout forward_features returns, as timm models state it
        self.base_kwargs = {k: v for k, v in kwargs.items() if k not in ('device', 'dtype')}
        self.backbone = timm.create_model(
            base_arch, num_classes=0, global_pool='', in_chans=in_chans, **dict(family.base_kwargs, **kwargs))
        self.in_chans = in_chans
        self.num_features = self.backbone.num_features
        self.num_prefix_tokens = getattr(self.backbone, 'num_prefix_tokens', 0) if family.output_fmt == 'NLC' else 0
        self.feature_info = [dict(info, module=f'backbone.{info["module"]}') for info in self.backbone.feature_info]
        self.drop_rate = drop_rate
        self.set_gcp_dim(min(256, self.num_features) if gcp_dim is None else gcp_dim)
        self.global_pool = None
        self.set_meta_layer(meta_layer, **(meta_layer_kwargs or {}))  # validated even without a GCP head
        self.reset_classifier(num_classes, global_pool)

    def gcp_model_args(self) -> Dict[str, Any]:
        """The head's kwargs (`GcpHeadMixin.gcp_model_args`), the base's own options and `drop_rate`."""
        return dict(self.base_kwargs, **super().gcp_model_args(), drop_rate=self.drop_rate)

    def is_gcp_checkpoint(self, state_dict: Dict[str, Any]) -> bool:
        return any(k.startswith('backbone.') for k in state_dict)

    def backbone_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.family.filter_fn is not None:
            state_dict = self.family.filter_fn(state_dict, self.backbone)
        checkpoint = {}
        for key, value in state_dict.items():
            for old, new in self.family.renames:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            if not key.startswith(self.family.head):
                checkpoint[f'backbone.{key}'] = value
        return checkpoint

    def new_module_prefixes(self) -> Tuple[str, ...]:
        return _GCP_ONLY

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The base's parameter groups under `backbone.`; the head matches none (the last group: full rate)."""
        return {name: _under_backbone(rule) for name, rule in self.backbone.group_matcher(coarse).items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        no_decay = getattr(self.backbone, 'no_weight_decay', set)()
        return {f'backbone.{name}' for name in no_decay}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              **kwargs) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The base's `forward_intermediates` (same options; the final output is `forward_features`')."""
        return self.backbone.forward_intermediates(self.transformed(x), indices, **kwargs)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the base's layers after `indices` (and the GCP head with `prune_head`)."""
        take_indices = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=False)
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def to_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """`forward_features` output as a (B, C, H, W) map: NHWC permuted, tokens without the prefix tokens as
        (B, C, N, 1)."""
        if self.family.output_fmt == 'NHWC':
            return x.permute(0, 3, 1, 2)
        if self.family.output_fmt == 'NLC':
            return x[:, self.num_prefix_tokens:].transpose(1, 2).unsqueeze(-1)
        return x

    def transformed(self, x: torch.Tensor) -> torch.Tensor:
        """The images, stacked with their transforms when group invariance is active."""
        return x if self.group_invariance is None else self.group_invariance(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The base's unpooled features; with group invariance, those of each transform, stacked transform-major."""
        return self.backbone(self.transformed(x))  # a headless timm model returns its unpooled features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool.pool_type:  # '' keeps the base's own unpooled output
            x = self.pool(self.to_feature_map(x))
        else:
            x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _under_backbone(rule: Any) -> Any:
    """A timm group_matcher rule (regex, (regex, order) pairs, or lists of them) re-anchored under `backbone.`."""
    if isinstance(rule, str):
        return r'^backbone\.(?:' + re.sub(r'^\^', '', rule) + ')'
    if isinstance(rule, tuple) and rule and isinstance(rule[0], str):
        return (_under_backbone(rule[0]),) + rule[1:]
    return [_under_backbone(r) for r in rule]


def _create_gcp_net(variant: str, base_arch: str, family: Family, pretrained: bool = False, **kwargs) -> nn.Module:
    if kwargs.get('features_only'):
        return _create_base_features(variant, base_arch, pretrained, **kwargs)
    return build_gcp_model(GcpNet, variant, pretrained, base_arch=base_arch, family=family, **kwargs)


_HEAD_KWARGS = ('global_pool', 'gcp_dim', 'meta_layer', 'meta_layer_kwargs', 'num_classes', 'invariance',
                'invariance_mode', *HEAD_OPTIONS)


def _create_base_features(variant: str, base_arch: str, pretrained: bool, pretrained_cfg: Any = None,
                          pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """`features_only`: the base's own feature extractor (no GCP head), with the tag's backbone weights."""
    tag = resolve_tag(variant, pretrained_cfg, pretrained_cfg_overlay).tag
    base = {k: v for k, v in kwargs.items() if k not in _HEAD_KWARGS}
    return timm.create_model(f'{base_arch}.{tag}' if tag else base_arch, pretrained=pretrained,
                             pretrained_cfg_overlay=pretrained_cfg_overlay, **base)


def _entrypoint(name: str, base_arch: str, family: Family) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create_gcp_net(name, base_arch, family, pretrained, **kwargs)
    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f'GCP head on timm {base_arch} (backbone weights of its pretrained tags).'
    return create


def _gcp_net_cfg(cfg) -> Dict[str, Any]:
    first_conv = cfg.first_conv
    if first_conv is not None:
        first_conv = f'backbone.{first_conv}' if isinstance(first_conv, str) else tuple(
            f'backbone.{c}' for c in first_conv)
    return dict(first_conv=first_conv, classifier='fc')


def _base_archs() -> Dict[str, Tuple[str, Family]]:
    """'gcp_<base>' -> (base, family) for every architecture of the families not registered otherwise."""
    return {f'gcp_{base}': (base, family)
            for module, family in FAMILIES.items()
            for base in timm.list_models(module=module, exclude_filters=family.exclude)
            if not timm.is_model(f'gcp_{base}')}


_ARCHS = _base_archs()
default_cfgs = generate_default_cfgs({
    name: cfg
    for arch, (base, _) in _ARCHS.items()
    for name, cfg in backbone_tags(arch, base, f'GCP head on timm {base}', (ISQRT_COV_PAPER,), _gcp_net_cfg).items()
})
for _name, (_base, _family) in _ARCHS.items():
    register_model(_entrypoint(_name, _base, _family))
