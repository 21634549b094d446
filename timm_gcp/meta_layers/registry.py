"""One registry of matrix normalisations ("meta-layers"): register, create, list."""
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from timm.layers import register_notrace_module
from torch import nn

from ..ops import check_covariance, check_square_batch, compute_dtype, fp32_island, refuse_torchscript

__all__ = ['MetaLayer', 'register_meta_layer', 'create_meta_layer', 'list_meta_layers', 'is_meta_layer']


@register_notrace_module  # a leaf for torch.fx (timm's feature extraction): its input checks stay in the graph
class MetaLayer(nn.Module):
    """Base of every meta-layer: (B, d, d) symmetric PSD -> (B, d, d).

    Runs with autocast disabled. The output is float32, or float64 when the input is float64; subclasses implement
    `normalize` on a tensor already in that dtype. Input contract (the same for every meta-layer): a shape other
    than (B, d, d) raises ValueError; an empty batch (B = 0 or d = 0) returns an empty (B, d, d) output; a
    non-finite covariance raises `NonFiniteCovarianceError` and one with an eigenvalue below -√eps·|tr Σ|
    `IndefiniteCovarianceError` (both ValueErrors, see `timm_gcp.ops.check_covariance`; checked in eager mode).
    """
    name = 'meta-layer'  # the registered name, set by `register_meta_layer`
    papers: Tuple[str, ...] = ()  # BibTeX of the papers behind the method, which model cards cite
    power: Optional[float] = None  # θ when the layer computes Σ^θ (exactly or approximately), None when it does not

    def forward(self, cov: torch.Tensor) -> torch.Tensor:
        check_square_batch(cov, f'{self.name} input')
        with fp32_island(cov):
            cov = cov.to(compute_dtype(cov))
            if cov.numel() == 0:
                return cov.clone()
            check_covariance(cov, f'{self.name} input covariance')
            return self.normalize(cov)

    __prepare_scriptable__ = refuse_torchscript

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


_META_LAYERS: Dict[str, Callable[..., MetaLayer]] = {}


def register_meta_layer(name: str) -> Callable[[Type[MetaLayer]], Type[MetaLayer]]:
    """Class decorator registering a meta-layer under `name` (also set as `cls.name`)."""
    def decorate(cls: Type[MetaLayer]) -> Type[MetaLayer]:
        if name in _META_LAYERS:
            raise ValueError(f'meta-layer {name!r} is already registered')
        cls.name = name
        _META_LAYERS[name] = cls
        return cls
    return decorate


def list_meta_layers() -> List[str]:
    """Names of every registered meta-layer, sorted."""
    return sorted(_META_LAYERS)


def is_meta_layer(name: str) -> bool:
    return name in _META_LAYERS


def create_meta_layer(name: str, **kwargs) -> MetaLayer:
    """Build the meta-layer registered as `name` with its options."""
    if name not in _META_LAYERS:
        raise ValueError(f'Unknown meta-layer {name!r}; known meta-layers: {", ".join(list_meta_layers())}')
    return _META_LAYERS[name](**kwargs)
