"""Model set-up for training any timm model: creation, checks, meta-layer switch and optimizer parameter groups."""
import difflib
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Iterable, List, Optional, Tuple

import timm
import torch
from timm.models import PretrainedCfg
from timm.optim import param_groups_weight_decay
from torch import nn

from .._text import preview
from ..layers import GCPPool
from ..meta_layers import create_meta_layer, list_meta_layers
from ..models import WeightsUnavailable, hub_weights
from .errors import WeightsUnreachable


def create_train_model(name: str, num_classes: int, pretrained: bool = False, model_kwargs: Optional[Dict] = None,
                       drop_rate: Optional[float] = None, drop_path_rate: Optional[float] = None,
                       initial_checkpoint: Optional[str] = None, backbone_weights: Optional[str] = None) -> nn.Module:
    """`timm.create_model` with one clear error for an unknown name or tag and for weights the Hub cannot deliver (in
    train.py's flags), and optional backbone initialisation."""
    try:
        with _from_hub(name, pretrained):
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate,
                                      drop_path_rate=drop_path_rate, checkpoint_path=initial_checkpoint or None,
                                      **(model_kwargs or {}))
        if backbone_weights:
            from ..models import load_backbone_weights  # logs which keys stay freshly initialised
            load_backbone_weights(model, backbone_weights)
    except WeightsUnavailable as err:
        raise WeightsUnreachable(_ways_out(err, name, backbone_weights)) from None
    return model


def _from_hub(name: str, pretrained: bool) -> ContextManager[None]:
    """`hub_weights` around creating `name` where anything comes from the Hub; ValueError for an unknown model or
    pretrained tag."""
    if name.startswith('hf-hub:'):  # its config.json comes from the Hub even without --pretrained
        return hub_weights(name, PretrainedCfg(hf_hub_id=name[len('hf-hub:'):]), True)
    if name.startswith('local-dir:'):
        return nullcontext()
    arch = name.split('.', 1)[0]
    if not timm.is_model(arch):
        similar = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        raise ValueError(f'Unknown model {name!r}; ' + (f'did you mean {", ".join(similar)}?' if similar else
                         "timm.list_models() lists them (timm.list_models('gcp_*'): the GCP models)"))
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm's 'Invalid pretrained tag'
        raise ValueError(f'{arch} has no pretrained tag {name.split(".", 1)[1]!r}; its tags: '
                         f'{preview(timm.list_pretrained(f"{arch}.*"), 10)}') from None
    return hub_weights(name, cfg, bool(pretrained and cfg and cfg.hf_hub_id and not cfg.file))


def _ways_out(err: WeightsUnavailable, model: str, backbone_weights: Optional[str]) -> str:
    """`err` with what a train.py user can do about it."""
    subject = model
    if err.name == backbone_weights:
        subject = f'--backbone-weights {err.name}'
        local = f'--backbone-weights FILE, FILE a local copy of the model.safetensors of {err.repo_id}'
    elif model.startswith('hf-hub:'):
        local = f'--model local-dir:FOLDER, FOLDER a local copy of {err.repo_id} (config.json, model.safetensors)'
    else:
        local = (f'--backbone-weights FILE instead of --pretrained, FILE a local copy of the model.safetensors of '
                 f'{err.repo_id} (the plain timm state dict of the backbone; its classifier is dropped)')
    return (f'{subject}: cannot load the weights of Hub repo {err.repo_id} ({err.reason}). Three ways out: connect to '
            f'the Hub and run again; set HF_HUB_OFFLINE=1 with a Hugging Face cache that holds {err.repo_id} (filled '
            f'once on a connected machine: hf download {err.repo_id}); or pass {local}')


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
    head = getattr(model, 'global_pool', None)
    if isinstance(head, GCPPool):
        try:
            head.riemannian_map.check_meta_layer(create_meta_layer(name))
        except ValueError as err:
            raise ValueError(f'--switch-meta-layer {name}: {err}') from None


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
