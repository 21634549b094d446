"""Model set-up for training any timm model: creation, checks, meta-layer switch and optimizer parameter groups."""
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from ..meta_layers import list_meta_layers


def create_train_model(name: str, num_classes: int, pretrained: bool = False, model_kwargs: Optional[Dict] = None,
                       drop_rate: Optional[float] = None, drop_path_rate: Optional[float] = None,
                       initial_checkpoint: Optional[str] = None, backbone_weights: Optional[str] = None) -> nn.Module:
    """`timm.create_model` with a clear error for unknown names, optional backbone initialisation."""
    if not (name.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(name)):
        similar = timm.list_models(f'*{name.split(".")[0]}*')[:10] or timm.list_models('gcp_*')
        raise ValueError(f'Unknown model {name!r}; similar registered models: {", ".join(similar)}')
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate,
                              drop_path_rate=drop_path_rate, checkpoint_path=initial_checkpoint or None,
                              **(model_kwargs or {}))
    if backbone_weights:
        from ..models import load_backbone_weights  # logs which keys stay freshly initialised
        load_backbone_weights(model, backbone_weights)
    return model


def check_input_size(model: nn.Module, input_size: Tuple[int, int, int], name: str) -> None:
    """Raise ValueError if `model` cannot run on one image of `input_size` (C, H, W); leaves it in training mode."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(f'model {name} cannot run at input size {tuple(input_size)} (--img-size too small?): '
                         f'{str(err).splitlines()[0]}') from None
    finally:
        model.train()


def nonfinite_tensors(tensors: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the floating-point tensors of `(name, tensor)` pairs (a state dict's items) holding NaN or Inf."""
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_meta_layer_switch(model: nn.Module, name: str) -> None:
    """Raise before training if `model` cannot switch to meta-layer `name`."""
    if not callable(getattr(model, 'set_meta_layer', None)):
        raise ValueError(f'--switch-meta-layer needs a GCP model with set_meta_layer(); {type(model).__name__} '
                         f'has none (use e.g. gcp_resnet50)')
    if name not in list_meta_layers():
        raise ValueError(f'--switch-meta-layer: unknown meta-layer {name!r}; known: {", ".join(list_meta_layers())}')


def set_meta_layer(models: List[Optional[nn.Module]], name: str) -> None:
    """Switch every given model (the trained one, its EMA copy) to meta-layer `name`."""
    for model in filter(None, models):
        model.set_meta_layer(name)


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """timm's weight-decay groups (none on biases, norms, `no_weight_decay()`), each split into backbone and classifier,
    the classifier's with `lr_scale` `head_lr_mult` (applied by timm's schedulers; timm has no per-module lr scale)."""
    no_decay = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay):
        for is_head, lr_scale in ((False, 1.0), (True, head_lr_mult)):
            params = [p for p in group['params'] if (id(p) in head_ids) == is_head]
            if params:
                groups.append({**group, 'params': params, 'lr_scale': lr_scale})
    return groups
