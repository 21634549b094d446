"""One registry of matrix normalisations ("meta-layers"): register, create, list."""
from typing import Callable, Dict, List, Type

import torch
from torch import nn

from ..ops import check_square_batch, compute_dtype, fp32_island

__all__ = ['MetaLayer', 'register_meta_layer', 'create_meta_layer', 'list_meta_layers', 'is_meta_layer']


class MetaLayer(nn.Module):
    """Base of every meta-layer: (B, d, d) symmetric PSD -> (B, d, d).

    Runs with autocast disabled. The output is float32, or float64 when the input is float64; subclasses implement
    `normalize` on a tensor already in that dtype.
    """

    def forward(self, cov: torch.Tensor) -> torch.Tensor:
        check_square_batch(cov, f'{type(self).__name__} input')
        with fp32_island(cov):
            return self.normalize(cov.to(compute_dtype(cov)))

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


_META_LAYERS: Dict[str, Callable[..., MetaLayer]] = {}


def register_meta_layer(name: str) -> Callable[[Type[MetaLayer]], Type[MetaLayer]]:
    """Class decorator registering a meta-layer under `name`."""
    def decorate(cls: Type[MetaLayer]) -> Type[MetaLayer]:
        if name in _META_LAYERS:
            raise ValueError(f'meta-layer {name!r} is already registered')
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
