"""The GCP head shared by every GCP model: pooling choice, head options, group invariance, meta-layer switching,
classifier reset and checkpoints that must fit the head."""
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from timm.layers import create_classifier
from torch import nn

from ..layers import HEAD_OPTIONS, GCPPool, GroupInvariance, GSoPBlock, head_option_defaults
from ..layers.riemannian import RiemannianMap
from ..meta_layers import MetaLayer, create_meta_layer
from ._backbone import state_dict_differences

__all__ = ['GcpHeadMixin']


class GcpHeadMixin:
    """Head methods of a timm model whose `global_pool` is a GCPPool (or any timm pool) followed by `fc`.

    The model sets `num_features`, then `set_gcp_dim`, `head_options` (`pop_head_options` of its kwargs) and
    `group_invariance` (`pop_invariance`), before calling `set_meta_layer` and `reset_classifier`; its
    `forward_features` runs the backbone on `group_invariance(x)` and its `forward_head` pools with `pool`.
    """
    output_fmt: str = 'NCHW'  # layout of forward_features' output, as timm models state it ('NHWC', 'NLC' ...)
    num_features: int
    in_chans: int
    gcp_dim: int
    head_options: Dict[str, Any]  # GCPPool's HEAD_OPTIONS, every one with its value
    group_invariance: Optional[GroupInvariance]  # IDCCP's invariance to a group of image transforms, or None
    global_pool: nn.Module
    fc: nn.Module

    def set_gcp_dim(self, gcp_dim: Any) -> None:
        """Check and set the channels the GCP head reduces the features to (1 to the backbone width)."""
        if isinstance(gcp_dim, bool) or not isinstance(gcp_dim, int) or not 1 <= gcp_dim <= self.num_features:
            raise ValueError(f'gcp_dim must be an int from 1 to {self.num_features} (the backbone width), '
                             f'got {gcp_dim!r}')
        self.gcp_dim = gcp_dim

    @staticmethod
    def pop_head_options(kwargs: Dict[str, Any], global_pool: str) -> Dict[str, Any]:
        """The GCP head's `HEAD_OPTIONS` taken out of a model's `kwargs` (the rest go to its backbone), with GCPPool's
        defaults for those not given; ValueError if one is set but `global_pool` is not 'gcp'."""
        defaults = head_option_defaults()
        given = {name: kwargs.pop(name) for name in HEAD_OPTIONS if name in kwargs}
        changed = {name: value for name, value in given.items() if value != defaults[name]}
        if changed and global_pool != 'gcp':
            raise ValueError(f'{", ".join(f"{k}={v!r}" for k, v in changed.items())}: an option of the GCP head, but '
                             f'this model pools with global_pool={global_pool!r}; use global_pool="gcp"')
        return {**defaults, **given}

    @staticmethod
    def pop_invariance(kwargs: Dict[str, Any]) -> Optional[GroupInvariance]:
        """The `invariance` ('flip', 'c4', 'd4' or None) and `invariance_mode` ('train' or 'test') taken out of a
        model's `kwargs`, as the model's `group_invariance` (None without invariance)."""
        group, mode = kwargs.pop('invariance', None), kwargs.pop('invariance_mode', 'train')
        if group is None and mode != 'train':
            raise ValueError(f'invariance_mode={mode!r} needs an invariance group, e.g. invariance="d4"')
        return None if group is None else GroupInvariance(group, mode)

    @property
    def invariance_args(self) -> Dict[str, Any]:
        """`invariance` and `invariance_mode` as model kwargs."""
        inv = self.group_invariance
        return dict(invariance=inv.group if inv else None, invariance_mode=inv.mode if inv else 'train')

    def gcp_model_args(self) -> Dict[str, Any]:
        """The JSON-serialisable kwargs that rebuild this model: pass them as `model_args` to timm's
        `save_for_hf` / `push_to_hf_hub` (timm < 1.0.31 records only what is passed explicitly)."""
        return dict(
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            global_pool=self.global_pool.pool_type,
            gcp_dim=self.gcp_dim,
            meta_layer=self.meta_layer_name,
            meta_layer_kwargs=dict(self.meta_layer_kwargs),
            **self.head_options,
            **self.invariance_args,
        )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) feature map -> pooled (B, F) features, by `global_pool`; with group invariance, the map holds
        the |G| transforms of each image stacked (`forward_features`), pooled as the union of their positions (mode
        'train') or averaged after pooling (mode 'test'). Without pooling (`global_pool=''`) the map stays as it is."""
        inv = self.group_invariance
        if inv is None or not inv.active or not self.global_pool.pool_type:
            return self.global_pool(x)
        if inv.mode == 'train':
            return self.global_pool(inv.union(x))
        return inv.average(self.global_pool(x))

    @property
    def meta_layer_name(self) -> str:
        """The GCP head's meta-layer (without a GCP head: the one a GCP head would get)."""
        return self.global_pool.meta_layer_name if isinstance(self.global_pool, GCPPool) else self._meta_layer[0]

    @property
    def meta_layer_kwargs(self) -> Dict[str, Any]:
        """Options of `meta_layer_name`."""
        return self.global_pool.meta_layer_kwargs if isinstance(self.global_pool, GCPPool) else self._meta_layer[1]

    def set_meta_layer(self, name: str, **kwargs) -> None:
        """Switch the head's matrix normalisation, keeping every parameter (the hybrid protocol)."""
        if isinstance(getattr(self, 'global_pool', None), GCPPool):
            self.global_pool.set_meta_layer(name, **kwargs)
            self.global_pool.meta_layer = self._like_backbone(self.global_pool.meta_layer)
        else:
            create_meta_layer(name, **kwargs)  # validate now; used when a GCP head is attached
        self._meta_layer = (name, dict(kwargs))

    def set_exportable(self, enable: bool = True) -> None:
        """Switch every meta-layer to its export path (ops that both ONNX exporters and torch.export support), or
        back; `timm.create_model(..., exportable=True)` builds the model so. See docs/models.md#deploying."""
        for kind in (RiemannianMap, MetaLayer):  # the maps first: they only refuse, so a refusal changes nothing
            for module in self.modules():
                if isinstance(module, kind):
                    module.set_exportable(enable)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New `fc` for `num_classes` (0: none). `global_pool` None keeps the current pooling (a GCP head keeps its
        trained reduction); 'gcp' attaches a GCP head; other timm pool types ('avg', '' for none) replace it (and reset
        the head options to their defaults)."""
        self._meta_layer = (self.meta_layer_name, dict(self.meta_layer_kwargs))  # outlives a replaced GCP head
        global_pool = self.global_pool.pool_type if global_pool is None else global_pool
        self.num_classes = num_classes
        if global_pool == 'gcp':
            if not isinstance(self.global_pool, GCPPool):
                self.global_pool = GCPPool(
                    self.num_features, self.gcp_dim, self.meta_layer_name, self.meta_layer_kwargs, **self.head_options)
            self.head_hidden_size = self.global_pool.out_features
            self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.head_options = head_option_defaults()  # they configure a GCP head: a new one starts plain
            self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool, self.fc = self._like_backbone(self.global_pool), self._like_backbone(self.fc)

    def _like_backbone(self, module: nn.Module) -> nn.Module:
        """`module` on the backbone's device and dtype, in the model's train/eval mode."""
        reference = next(self.parameters())  # the stem's first parameter
        return module.to(device=reference.device, dtype=reference.dtype).train(self.training)

    def new_module_prefixes(self) -> Tuple[str, ...]:
        """State-dict prefixes of what a plain timm backbone lacks: the GCP head, GSoP blocks and `fc`."""
        gcp = tuple(f'{name}.' for name, m in self.named_modules() if isinstance(m, (GCPPool, GSoPBlock)))
        return gcp + ('fc.',)

    def is_gcp_checkpoint(self, state_dict: Dict[str, Any]) -> bool:
        """Whether `state_dict` is this model's own (an export), not a plain timm backbone's."""
        gcp = tuple(p for p in self.new_module_prefixes() if p != 'fc.')
        return any(k.startswith(gcp) for k in state_dict)

    def backbone_checkpoint(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """A plain timm checkpoint of the backbone under this model's key names, without the backbone's classifier."""
        return {k: v for k, v in state_dict.items() if not k.startswith('fc.')}

    def head_mismatch(self, state_dict: Mapping[str, Any], source: str = 'the checkpoint',
                      with_fc: bool = True) -> Optional[str]:
        """Why `state_dict` does not fit this model's head (`global_pool`, and `fc` if `with_fc`), naming the head
        options, or None if it fits."""
        prefixes = ('global_pool.', 'fc.') if with_fc else ('global_pool.',)

        def head(tensors: Mapping[str, Any]) -> Dict[str, Any]:
            return {k: v for k, v in tensors.items()
                    if k.startswith(prefixes) and not k.endswith('num_batches_tracked')}
        missing, unexpected, mismatched = state_dict_differences(head(self.state_dict()), head(state_dict))
        if not (missing or unexpected or mismatched):
            return None
        problems = [f'{len(keys)} {kind} (e.g. {", ".join(keys[:2])})' for kind, keys in
                    (('missing', missing), ('unexpected', unexpected), ('mismatched', mismatched)) if keys]
        defaults = head_option_defaults()
        options = ', '.join(f'{k}={v!r}' for k, v in self.head_options.items() if v != defaults[k]) or 'none'
        name = getattr(self, 'pretrained_cfg', {}).get('architecture') or type(self).__name__
        return (f'{source} does not fit the head of this {name} (global_pool={self.global_pool.pool_type!r}, '
                f'gcp_dim={self.gcp_dim}, head options set: {options}; {self.head_hidden_size} pooled features, '
                f'{self.num_classes} classes): {"; ".join(problems)}. It was saved with another head (other head '
                f'options such as gaussian, progressive_widths, compress_dim, group_conv, or another gcp_dim or '
                f'num_classes): create the model with the model_args of its config.json, or load only its backbone '
                f'(drop its global_pool.* and fc.* entries)')

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """nn.Module's, but a strict load of a checkpoint whose head does not fit raises one ValueError naming the head
        options before anything is copied."""
        if strict:
            problem = self.head_mismatch(state_dict)
            if problem:
                raise ValueError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
