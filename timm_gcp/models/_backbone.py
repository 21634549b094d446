"""Initialise a GCP model's backbone from a plain timm ResNet checkpoint (a file or a timm pretrained name)."""
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import timm
import torch
from timm.models import load_state_dict
from torch import nn

from ..layers import GCPPool, GSoPBlock

__all__ = ['load_backbone_weights', 'state_dict_differences']

_logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.tar')
_CLASSIFIER = 'fc.'


def _read_state_dict(source: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    name = str(source)
    if Path(name).is_file():
        return load_state_dict(name)
    if Path(name).suffix in _CHECKPOINT_SUFFIXES or os.sep in name and not name.startswith('hf-hub:'):
        raise FileNotFoundError(f'backbone checkpoint {name} does not exist')
    if name.startswith('hf-hub:') or timm.is_model(name.split('.', 1)[0]):
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


def _new_module_prefixes(model: nn.Module) -> List[str]:
    """Names of the modules a plain ResNet lacks: the GCP head, GSoP blocks and the classifier."""
    prefixes = [f'{name}.' for name, module in model.named_modules() if isinstance(module, (GCPPool, GSoPBlock))]
    return prefixes + [_CLASSIFIER]


def load_backbone_weights(model: nn.Module, source: Union[str, os.PathLike]) -> List[str]:
    """Load the backbone of `model` from a plain timm ResNet checkpoint and return the keys left freshly initialised.

    `source` is a checkpoint file (.safetensors/.pth/.bin, bare or inside {'state_dict': ...}) or a timm pretrained
    name ('resnet50.a1_in1k', 'resnet50.tv_in1k', 'hf-hub:...'). The checkpoint's classifier is dropped; the GCP
    head, GSoP blocks and `fc` keep their initialisation. Raises ValueError when the checkpoint is not a backbone of
    the same architecture (missing, unexpected or differently shaped keys).
    """
    checkpoint = {k: v for k, v in _read_state_dict(source).items() if not k.startswith(_CLASSIFIER)}
    new_prefixes = tuple(_new_module_prefixes(model))
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(new_prefixes)}
    missing, unexpected, mismatched = state_dict_differences(target, checkpoint)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected or mismatched:
        problems = [f'{len(keys)} {what} (e.g. {", ".join(keys[:3])})'
                    for what, keys in (('missing', missing), ('unexpected', unexpected), ('mismatched', mismatched))
                    if keys]
        raise ValueError(
            f'{source} is not a backbone checkpoint for {type(model).__name__} with these layers: '
            f'{"; ".join(problems)}. Expected a plain timm ResNet of the same depth (e.g. resnet50.* for '
            f'gcp_resnet50 / gsop_resnet50).')
    model.load_state_dict(checkpoint, strict=False)
    new_keys = sorted(k for k in model.state_dict() if k not in checkpoint)
    _logger.warning(
        'Initialised the backbone from %s; %d keys are new (freshly initialised): %s',
        source, len(new_keys), ', '.join(new_keys))
    return new_keys
