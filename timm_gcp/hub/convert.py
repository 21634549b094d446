"""Convert the papers' official GCP ResNet checkpoints (layouts: `gcp_resnet.official_layout`) into export folders."""
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import timm
from torch import nn

from .._text import preview
from ..models.gcp_resnet import official_layout, remap_official
from .export import export_model


class Source(NamedTuple):
    """What an official release's weights cannot tell: its head's meta-layer (and options) and its layer4 stride."""
    meta_layer: str
    meta_layer_kwargs: Dict[str, Any]
    layer4_stride: int
    description: str


SOURCES: Dict[str, Source] = {  # fast-MPN-COV trains mpncovresnets; DifferentiableSVD a torchvision resnet50
    'fast-mpn-cov': Source('isqrt', {'num_iter': 5}, 1, 'fast-MPN-COV / iSQRT-COV official release'),
    'svd-pade': Source('svd_pade', {}, 2, 'DifferentiableSVD SVD-Pade official release'),
}


def convert_checkpoint(src: Union[str, Path], model_name: str, output_dir: Union[str, Path], *,
                       source: str = 'fast-mpn-cov', meta_layer: Optional[str] = None,
                       layer4_stride: Optional[int] = None, label_names: Optional[Sequence[str]] = None,
                       command: Optional[str] = None) -> Tuple[Path, nn.Module]:
    """(export folder for `timm.create_model('local-dir:' + output_dir)`, model) of `src`, an official checkpoint."""
    if source not in SOURCES:
        raise ValueError(f'unknown source {source!r}; known: {sorted(SOURCES)}')
    if not Path(src).is_file():
        raise FileNotFoundError(f'checkpoint {src} does not exist')
    try:  # timm: torch.load(weights_only=True), so a pickle that needs code is refused; {'state_dict': ...} unwrapped
        state_dict = timm.models.load_state_dict(str(src))
    except Exception as e:
        raise ValueError(f'{src} is no state dict that torch.load(weights_only=True) can read: {e}') from e
    layout = official_layout(state_dict)
    if layout is None:
        raise ValueError(f'unknown checkpoint layout in {src} (no official GCP head); its keys: {preview(sorted(state_dict))}')
    ours = remap_official(state_dict)  # read here only for the sizes the model is built with
    spec = SOURCES[source]
    meta_layer = meta_layer or spec.meta_layer
    n = ours['fc.weight'].shape[0]
    model = timm.create_model(  # the same load as pretrained_cfg_overlay=dict(file=src), checked to fit the model
        model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(src), num_classes=n), num_classes=n,
        gcp_dim=ours['global_pool.conv.weight'].shape[0], layer4_stride=layer4_stride or spec.layer4_stride,
        meta_layer=meta_layer, meta_layer_kwargs=spec.meta_layer_kwargs if meta_layer == spec.meta_layer else None)
    names = label_names or (timm.data.ImageNetInfo().label_names() if n == 1000 else [f'class_{i}' for i in range(n)])
    recipe = dict(converted_from=Path(src).name, source=spec.description, layout=layout)  # the rest is in model_args
    return export_model(model.eval(), output_dir, label_names=list(names), recipe=recipe, command=command,
                        dataset='imagenet-1k' if n == 1000 else None), model
