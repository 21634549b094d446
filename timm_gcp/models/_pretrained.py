"""Pretrained tags of GCP models: timm's own backbone weights under a fresh GCP head, derived from timm's pretrained
cfgs at import, and the build path that loads them with one clear error when the Hub cannot deliver them."""
import os
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Tuple, Type

from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg
from timm.models._registry import get_arch_pretrained_cfgs, split_model_name_tag
from torch import nn

from ._backbone import backbone_filter_fn
from ._hub_access import hub_weights

__all__ = ['HUB_ORG', 'ISQRT_COV_PAPER', 'GSOP_PAPER', 'IDCCP_PAPER', 'backbone_tags', 'build_gcp_model', 'resolve_tag']

HUB_ORG: str = os.environ.get('TIMM_GCP_HUB_ORG', 'timm-gcp')
"""Hugging Face Hub organisation for weights trained with a GCP head (env `TIMM_GCP_HUB_ORG`, read at import).
None is published yet, so no registered tag points there: every tag loads a timm backbone (`timm/...`)."""

ISQRT_COV_PAPER = 'arXiv:1712.01034'
GSOP_PAPER = 'arXiv:1811.12006'
IDCCP_PAPER = 'arXiv:2011.05702'


def backbone_tags(arch: str, base_arch: str, description: str, paper_ids: Tuple[str, ...],
                  adapt: Callable[[PretrainedCfg], Dict[str, Any]]) -> Dict[str, PretrainedCfg]:
    """'arch.tag' -> pretrained cfg for every tag of timm's `base_arch` whose weights are a timm Hub repo: the
    backbone's weights, data config and license, `paper_ids` before the backbone's, and the fields `adapt(cfg)`
    returns replaced."""
    def gcp_fields(cfg: PretrainedCfg) -> Dict[str, Any]:
        base_papers = (cfg.paper_ids,) if isinstance(cfg.paper_ids, str) else tuple(cfg.paper_ids or ())
        return dict(adapt(cfg), paper_ids=paper_ids + base_papers)

    base_cfgs = get_arch_pretrained_cfgs(base_arch)
    cfgs = {}
    for name, cfg in base_cfgs.items():
        if not (cfg.hf_hub_id or '').startswith('timm/') or cfg.custom_load == 'hf':
            continue
        tag = split_model_name_tag(name)[1]
        changes = dict(url=None, custom_load=False,  # the Hub's safetensors, not an original release file
                       description=f'{description}; backbone {cfg.hf_hub_id}, GCP head freshly initialised')
        cfgs[f'{arch}.{tag}'] = replace(cfg, **changes, **gcp_fields(cfg))
    if not cfgs and base_cfgs:  # no loadable weights: the base's data config, untagged
        cfg = next(iter(base_cfgs.values()))
        cfgs[arch] = replace(cfg, url=None, file=None, hf_hub_id=None, hf_hub_filename=None, description=description,
                             **gcp_fields(cfg))
    return cfgs


def resolve_tag(variant: str, pretrained_cfg: Any = None,
                pretrained_cfg_overlay: Optional[Dict[str, Any]] = None) -> PretrainedCfg:
    """timm's `resolve_pretrained_cfg`, with a ValueError naming the model and its tags for an unknown tag."""
    try:
        return resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
    except RuntimeError:
        tags = [name.split('.', 1)[1] for name in get_arch_pretrained_cfgs(variant)]
        raise ValueError(
            f'{variant} has no pretrained tag {pretrained_cfg!r}; its tags are those of its timm backbone: '
            f'{", ".join(tags)} (timm.list_pretrained("{variant}.*")). Use one of them, or the bare name '
            f'{variant!r} for the default.') from None


def build_gcp_model(model_cls: Type[nn.Module], variant: str, pretrained: bool = False,
                    pretrained_filter_fn: Callable = backbone_filter_fn, **kwargs) -> nn.Module:
    """`build_model_with_cfg` for GCP models: pretrained weights go through `pretrained_filter_fn` (default
    `backbone_filter_fn`: every backbone tensor required, GCP head fresh, loaded strictly), and a bad tag, bad model
    kwargs or unreachable weights raise one error that names the model and the tag."""
    cfg = resolve_tag(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    from_hub = pretrained and bool(cfg.hf_hub_id) and not (cfg.file or cfg.state_dict or cfg.source == 'local-dir')
    with hub_weights(f'{variant}.{cfg.tag}', cfg, from_hub):
        try:
            return build_model_with_cfg(
                model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
        except ValueError as err:
            if variant in str(err):
                raise
            raise ValueError(f'{variant}: {err}') from None
