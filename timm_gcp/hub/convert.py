"""Convert the papers' official GCP ResNet checkpoints into timm-gcp models.

Layouts (names as in `official_checkpoint_layouts.json`):
- `mpncovresnet`: fast-MPN-COV's `mpncovresnet50/101` (`conv1 ... layer4`, `layer_reduce`, `layer_reduce_bn`, `fc`).
- `newmodel`: the `features.* / representation.conv_dr_block.* / classifier.*` model of the fast-MPN-COV training
  script (also DifferentiableSVD's, which its SVD-Pade ResNet-50 release uses); `features` may be a DataParallel
  (`features.module.*`), the whole model DDP-wrapped (`module.*`), bare or inside {'state_dict': ...}.

Sources fix what the weights cannot tell: the meta-layer and the stride of layer4. fast-MPN-COV trains
`mpncovresnet` backbones (layer4 stride 1, iSQRT with 5 iterations); DifferentiableSVD's ResNet-50 recipe builds a
torchvision-style `resnet50` (layer4 stride 2) with the SVD-Pade head.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import nn

from ..layers import GCPPool
from ..models import state_dict_differences
from .export import export_model

__all__ = ['SOURCES', 'Source', 'load_official_checkpoint', 'detect_layout', 'remap_state_dict', 'convert_checkpoint']


@dataclass(frozen=True)
class Source:
    """An official release: how its head normalises and how its backbone strides."""
    meta_layer: str
    meta_layer_kwargs: Mapping[str, Any]
    layer4_stride: int
    description: str


SOURCES: Dict[str, Source] = {
    'fast-mpn-cov': Source('isqrt', {'num_iter': 5}, 1, 'fast-MPN-COV / iSQRT-COV official release'),
    'svd-pade': Source('svd_pade', {}, 2, 'DifferentiableSVD SVD-Pade official release'),
}

_NEWMODEL_FEATURES = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}


def load_official_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Tensors of a `.pth`/`.pth.tar` (pickles are opened with weights_only=True only), unwrapped and unprefixed."""
    if not Path(path).is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a pickle that needs arbitrary code is refused, on purpose
        raise ValueError(f'{path} could not be loaded with torch.load(weights_only=True): {e}') from e
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
        obj = obj['state_dict']
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f'{path} holds no state dict (expected name -> tensor, bare or under "state_dict")')
    return {re.sub(r'^module\.', '', k).replace('features.module.', 'features.'): v for k, v in obj.items()}


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'mpncovresnet' or 'newmodel' (see the module docstring) from the keys of an unwrapped state dict."""
    if 'layer_reduce.weight' in state_dict:
        return 'mpncovresnet'
    if 'representation.conv_dr_block.0.weight' in state_dict:
        return 'newmodel'
    raise ValueError('unknown checkpoint layout: expected fast-MPN-COV mpncovresnet keys (layer_reduce.weight, '
                     'fc.*) or the training script\'s (features.*, representation.conv_dr_block.*, classifier.*); '
                     f'found e.g. {sorted(state_dict)[:5]}')


def _rename(key: str, layout: str, pool: str) -> str:
    if layout == 'mpncovresnet':
        key = re.sub(r'^layer_reduce_bn\.', f'{pool}.bn.', key)
        return re.sub(r'^layer_reduce\.', f'{pool}.conv.', key)
    head = {'representation.conv_dr_block.0.': f'{pool}.conv.', 'representation.conv_dr_block.1.': f'{pool}.bn.',
            'classifier.': 'fc.'}
    for old, new in head.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r'features\.(\d+)\.(.*)', key)
    if m and m[1] in _NEWMODEL_FEATURES:
        return f'{_NEWMODEL_FEATURES[m[1]]}.{m[2]}'
    raise ValueError(f'checkpoint key {key!r} has no place in a timm-gcp ResNet')


def remap_state_dict(state_dict: Mapping[str, torch.Tensor], layout: str, pool: str = 'global_pool'
                     ) -> Dict[str, torch.Tensor]:
    """Official names -> timm-gcp names (`pool` is the GCP module's name in the model)."""
    return {_rename(k, layout, pool): v for k, v in state_dict.items()}


def _gcp_pool_name(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, GCPPool)]
    if len(names) != 1:
        raise ValueError(f'{type(model).__name__} has {len(names)} GCP pooling modules; conversion needs exactly one')
    return names[0]


def convert_checkpoint(
        src: Union[str, os.PathLike],
        model_name: str,
        output_dir: Union[str, os.PathLike],
        *,
        source: str = 'fast-mpn-cov',
        meta_layer: Optional[str] = None,
        layer4_stride: Optional[int] = None,
        label_names: Optional[Sequence[str]] = None,
        command: Optional[str] = None,
) -> Tuple[Path, nn.Module]:
    """Convert `src` into `output_dir` (model.safetensors, config.json, README.md), loadable with
    `timm.create_model('local-dir:' + output_dir)`; returns the folder and the loaded model."""
    if source not in SOURCES:
        raise ValueError(f'unknown source {source!r}; known: {sorted(SOURCES)}')
    spec = SOURCES[source]
    state_dict = load_official_checkpoint(src)
    layout = detect_layout(state_dict)
    reduce_key = 'layer_reduce.weight' if layout == 'mpncovresnet' else 'representation.conv_dr_block.0.weight'
    fc_key = 'fc.weight' if layout == 'mpncovresnet' else 'classifier.weight'
    num_classes, gcp_dim = state_dict[fc_key].shape[0], state_dict[reduce_key].shape[0]
    meta_layer = meta_layer or spec.meta_layer
    model = timm.create_model(
        model_name, num_classes=num_classes, gcp_dim=gcp_dim, meta_layer=meta_layer,
        meta_layer_kwargs=dict(spec.meta_layer_kwargs) if meta_layer == spec.meta_layer else None,
        layer4_stride=layer4_stride or spec.layer4_stride)
    remapped = remap_state_dict(state_dict, layout, _gcp_pool_name(model))
    missing, unexpected, wrong_shape = state_dict_differences(model.state_dict(), remapped)
    if missing or unexpected or wrong_shape:
        raise ValueError(f'{src} ({layout} layout) does not fit {model_name}: missing {missing[:5]}, '
                         f'unexpected {unexpected[:5]}, shape mismatches {wrong_shape[:5]}')
    model.load_state_dict(remapped, strict=True)
    model.eval()
    if label_names is None:
        label_names = (timm.data.ImageNetInfo().label_names() if num_classes == 1000
                       else [f'class_{i}' for i in range(num_classes)])
    recipe = {'converted_from': Path(src).name, 'source': spec.description, 'layout': layout,
              'meta_layer': meta_layer, 'layer4_stride': model.layer4_stride}
    out = export_model(model, output_dir, label_names=list(label_names), recipe=recipe, command=command,
                       dataset='imagenet-1k' if num_classes == 1000 else None)
    return out, model
