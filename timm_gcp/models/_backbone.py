"""Initialise a GCP model's backbone from a plain timm checkpoint of its backbone architecture: the one loading path
of `pretrained=True` (as timm's `pretrained_filter_fn`) and of `load_backbone_weights`."""
import difflib
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import timm
import torch
from timm.models import PretrainedCfg, load_state_dict
from torch import nn

from ._hub_access import hub_weights

__all__ = ['load_backbone_weights', 'backbone_filter_fn', 'pretrained_source', 'state_dict_differences']

_logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.tar')


def _read_state_dict(source: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    name = str(source)
    if Path(name).is_file():
        return load_state_dict(name)
    if Path(name).suffix in _CHECKPOINT_SUFFIXES or os.sep in name and not name.startswith('hf-hub:'):
        raise FileNotFoundError(f'backbone checkpoint {name} does not exist')
    if name.startswith('hf-hub:'):
        with hub_weights(name, PretrainedCfg(hf_hub_id=name[len('hf-hub:'):]), True):
            return timm.create_model(name, pretrained=True).state_dict()
    arch = name.split('.', 1)[0]
    if timm.is_model(arch):
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # timm's 'Invalid pretrained tag'
            tags = timm.list_pretrained(f'{arch}.*')
            raise ValueError(f'{name!r}: timm has no such pretrained tag of {arch}; did you mean '
                             f'{", ".join(difflib.get_close_matches(name, tags, n=5, cutoff=0)) or arch}?') from None
        with hub_weights(name, cfg, bool(cfg and cfg.hf_hub_id)):
            return timm.create_model(name, pretrained=True).state_dict()
    raise ValueError(f'{name!r} is neither a checkpoint file nor a timm model name such as "resnet50.a1_in1k"')


def state_dict_differences(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
                           ) -> Tuple[List[str], List[str], List[str]]:
    """Keys of `given` against `expected`: (missing, unexpected, 'key: given (...) vs expected (...)'), each sorted."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [f'{k}: given {tuple(given[k].shape)} vs expected {tuple(v.shape)}'
                  for k, v in sorted(expected.items()) if k in given and given[k].shape != v.shape]
    return missing, unexpected, mismatched


def _check_complete(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str,
                    model: nn.Module, what: str) -> None:
    missing, unexpected, mismatched = state_dict_differences(expected, given)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected or mismatched:
        problems = [f'{len(keys)} {kind} (e.g. {", ".join(keys[:3])})'
                    for kind, keys in (('missing', missing), ('unexpected', unexpected), ('mismatched', mismatched))
                    if keys]
        raise ValueError(f'{source} is not {what} for {_model_name(model)} with these layers: {"; ".join(problems)}.')


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def select_backbone_weights(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str, export: bool = False
                            ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """A complete state dict for `model` from `state_dict`, and the keys that keep the model's own initialisation.

    A GCP checkpoint of the model (an export, or any checkpoint when `export`) must hold every key but `fc`. A plain
    timm checkpoint of the backbone architecture must hold every backbone tensor; its classifier is dropped and the
    GCP head, GSoP blocks and `fc` keep the model's initialisation (logged once). Anything else raises ValueError.
    """
    expected = model.state_dict()
    if export or model.is_gcp_checkpoint(state_dict):  # `fc` is left to timm, which drops it for another num_classes
        problem = model.head_mismatch(state_dict, source, with_fc=False)
        if problem:
            raise ValueError(problem)
        _check_complete(_without_fc(expected), _without_fc(state_dict), source, model, 'a checkpoint')
        return state_dict, []
    checkpoint = model.backbone_checkpoint(state_dict)
    backbone = {k: v for k, v in expected.items() if not k.startswith(model.new_module_prefixes())}
    _check_complete(backbone, checkpoint, source, model, f'a backbone checkpoint (expected {_backbone_hint(model)})')
    kept = sorted(k for k in expected if k not in checkpoint)
    _logger.warning('Initialised the backbone of %s from %s; %d keys are new (freshly initialised): %s',
                    _model_name(model), source, len(kept), ', '.join(kept))
    return dict(checkpoint, **{k: expected[k] for k in kept}), kept


def _without_fc(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if not k.startswith('fc.')}


def _backbone_hint(model: nn.Module) -> str:
    base = getattr(model, 'base_arch', None)
    return f'a plain timm {base}.* checkpoint' if base else 'a plain timm ResNet of the same depth'


def pretrained_source(model: nn.Module) -> str:
    """Where timm loads `model`'s pretrained weights from, as messages name it (timm's order: file, Hub, url)."""
    cfg = getattr(model, 'pretrained_cfg', {})
    return cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url') or 'the pretrained checkpoint'


def backbone_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm `pretrained_filter_fn` of every GCP model (see `select_backbone_weights`). Weights from an `hf-hub:` repo
    or a `local-dir:` folder, whose config.json names this architecture, are an export of it: the model's own, even
    without a GCP head (`global_pool='avg'`), whose keys a plain timm checkpoint's would not tell apart."""
    export = getattr(model, 'pretrained_cfg', {}).get('source') in ('hf-hub', 'local-dir')
    return select_backbone_weights(state_dict, model, pretrained_source(model), export)[0]


def load_backbone_weights(model: nn.Module, source: Union[str, os.PathLike]) -> List[str]:
    """Load the backbone of `model` from a plain timm checkpoint and return the keys left freshly initialised.

    `source` is a checkpoint file (.safetensors/.pth/.bin, bare or inside {'state_dict': ...}) or a timm pretrained
    name ('resnet50.a1_in1k', 'hf-hub:...'). The checkpoint's classifier is dropped; the GCP head, GSoP blocks and
    `fc` keep their initialisation. Raises ValueError when the checkpoint is not a backbone of the same architecture
    (missing, unexpected or differently shaped keys). `pretrained=True` on a tag loads the same way.
    """
    checkpoint, kept = select_backbone_weights(_read_state_dict(source), model, str(source))
    model.load_state_dict(checkpoint)
    return kept
