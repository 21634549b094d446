"""Pretrained tags: the Hub organisation, what each tag is, the recipe that produces it, and how models are built."""
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

from huggingface_hub.errors import EntryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

__all__ = ['HUB_ORG', 'PretrainedTag', 'PRETRAINED_TAGS', 'pretrained_cfgs', 'recipe_command', 'build_gcp_model']

HUB_ORG: str = os.environ.get('TIMM_GCP_HUB_ORG', 'timm-gcp')
"""Hugging Face Hub organisation of every published timm-gcp weight (env `TIMM_GCP_HUB_ORG`, read at import)."""

ISQRT_COV_PAPER = 'arXiv:1712.01034'
GSOP_PAPER = 'arXiv:1811.12006'


@dataclass(frozen=True)
class PretrainedTag:
    """What one pretrained tag is: data, resolution, classes, the recipe and start point that produce it, and the
    meta-layer its weights were trained with."""
    dataset: str
    num_classes: int
    img_size: int
    crop_pct: float
    recipe: str
    data_dir: str
    init_tag: Optional[str] = None  # the tag of the same architecture it is fine-tuned from
    meta_layer: str = 'isqrt'
    meta_layer_kwargs: Optional[Dict[str, Any]] = None  # None: the architecture's default options


_FINEGRAINED = 'recipes/finegrained_448.yaml'
PRETRAINED_TAGS: Dict[str, PretrainedTag] = {
    'in1k': PretrainedTag('ImageNet-1k', 1000, 224, 0.875, 'recipes/imagenet_65ep.yaml', '/path/to/imagenet'),
    'in1k_ft_cub_448': PretrainedTag('CUB-200-2011', 200, 448, 1.0, _FINEGRAINED, '/path/to/cub', 'in1k'),
    'in1k_ft_aircraft_448': PretrainedTag('FGVC-Aircraft', 100, 448, 1.0, _FINEGRAINED, '/path/to/aircraft', 'in1k'),
    'in1k_ft_cars_448': PretrainedTag('Stanford Cars', 196, 448, 1.0, _FINEGRAINED, '/path/to/cars', 'in1k'),
}


def recipe_command(arch: str, tag: str) -> str:
    """The command that trains `arch.tag`."""
    spec = PRETRAINED_TAGS[tag]
    model = f'{arch}.{spec.init_tag} --pretrained' if spec.init_tag else arch
    return (f'accelerate launch train.py -c {spec.recipe} --model {model} --num-classes {spec.num_classes} '
            f'--data-dir {spec.data_dir}')


def pretrained_cfgs(
        arch: str,
        description: str,
        paper_ids: Tuple[str, ...],
        paper_name: str,
        reduction: int = 16,
) -> Dict[str, Dict[str, Any]]:
    """timm pretrained cfgs of every tag of `arch` ('arch.tag' -> cfg), each with its full Hub id."""
    cfgs = {}
    for tag, spec in PRETRAINED_TAGS.items():
        pool = spec.img_size // reduction
        cfgs[f'{arch}.{tag}'] = dict(
            hf_hub_id=f'{HUB_ORG}/{arch}.{tag}',
            num_classes=spec.num_classes,
            input_size=(3, spec.img_size, spec.img_size),
            pool_size=(pool, pool),
            crop_pct=spec.crop_pct,
            interpolation='bilinear',
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv='conv1',
            classifier='fc',
            license='apache-2.0',
            paper_ids=paper_ids,
            paper_name=paper_name,
            description=f'{description}, {spec.meta_layer} meta-layer, trained on {spec.dataset} at {spec.img_size} px',
            notes=(f'recipe: {spec.recipe}', f'produced by: {recipe_command(arch, tag)}'),
        )
    return cfgs


def _weights_from_hub(cfg: PretrainedCfg) -> bool:
    return bool(cfg.hf_hub_id) and not cfg.file and not cfg.state_dict and cfg.source != 'local-dir'


def _unpublished_error(variant: str, tag: str, cfg: PretrainedCfg, cause: BaseException) -> RuntimeError:
    return RuntimeError(
        f'{variant}.{tag} has no published weights yet or the Hub cannot be reached (hub id {cfg.hf_hub_id} not '
        f'reachable: {type(cause).__name__}). Produce them with `{recipe_command(variant, tag)}` '
        f'(recipe {PRETRAINED_TAGS[tag].recipe}), or start from a timm ResNet with '
        f'timm_gcp.load_backbone_weights(model, "resnet50.a1_in1k").'
    )


def build_gcp_model(model_cls: Type[nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`build_model_with_cfg` plus two things: the tag's meta-layer is the default, and weights that cannot be
    fetched from the Hub raise an error naming the tag and the recipe that produces them."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    spec = PRETRAINED_TAGS.get(cfg.tag)
    if spec is not None and 'meta_layer' not in kwargs:
        kwargs['meta_layer'] = spec.meta_layer
        if spec.meta_layer_kwargs is not None:
            kwargs.setdefault('meta_layer_kwargs', dict(spec.meta_layer_kwargs))
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (OSError, EntryNotFoundError) as err:
        if not (pretrained and spec is not None and _weights_from_hub(cfg)):
            raise
        raise _unpublished_error(variant, cfg.tag, cfg, err) from err
