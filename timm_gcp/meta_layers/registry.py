"""One registry of matrix normalisations ("meta-layers"): register, create, list."""
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from timm.layers import is_exportable, register_notrace_module
from torch import nn

from ..ops import (
    batch_elements, check_covariance, check_square_batch, compute_dtype, fp32_island, is_tracing, refuse_torchscript)
from .options import bool_option

__all__ = ['MetaLayer', 'ExportAccuracyError', 'register_meta_layer', 'create_meta_layer', 'list_meta_layers',
           'is_meta_layer']


class ExportAccuracyError(ValueError):
    """A meta-layer's export path differs from its exact forward by more than it allows, on the batch given."""


@register_notrace_module  # a leaf for torch.fx (timm's feature extraction): its input checks stay in the graph
class MetaLayer(nn.Module):
    """Base of every meta-layer: (B, d, d) symmetric PSD -> (B, d, d).

    Runs with autocast disabled. The output is float32, or float64 when the input is float64; subclasses implement
    `normalize` on a tensor already in that dtype. Input contract (the same for every meta-layer): a shape other
    than (B, d, d) raises ValueError; an empty batch (B = 0 or d = 0) returns an empty (B, d, d) output; a
    non-finite covariance raises `NonFiniteCovarianceError` and one with an eigenvalue below -√eps·|tr Σ|
    `IndefiniteCovarianceError` (both ValueErrors, see `timm_gcp.ops.check_covariance`; checked in eager mode).

    Export mode (`set_exportable`; on from construction under timm's `set_exportable(True)` config, e.g.
    `timm.create_model(..., exportable=True)`) computes `export_normalize`: ops that both ONNX exporters and
    torch.export support. A layer whose export path approximates `normalize` sets `export_tolerance`; every eager
    forward in export mode (not a trace) then also runs `normalize` and raises `ExportAccuracyError` where they
    differ by more than that, so the batch an export runs first checks the export path on real data.
    """
    name = 'meta-layer'  # the registered name, set by `register_meta_layer`
    papers: Tuple[str, ...] = ()  # BibTeX of the papers behind the method, which model cards cite
    export_tolerance: Optional[float] = None  # largest max|export − exact| / max|exact| per matrix; None: exact
    power: Optional[float] = None  # θ when the layer computes Σ^θ (exactly or approximately), None when it does not

    def __init__(self):
        super().__init__()
        self.exportable = False

    def forward(self, cov: torch.Tensor) -> torch.Tensor:
        check_square_batch(cov, f'{self.name} input')
        with fp32_island(cov):
            cov = cov.to(compute_dtype(cov))
            if cov.numel() == 0:
                return cov.clone()
            check_covariance(cov, f'{self.name} input covariance')
            if not self.exportable:
                return self.normalize(cov)
            out = self.export_normalize(cov)
            if self.export_tolerance is not None and not is_tracing():
                self.check_export_accuracy(out, self.normalize(cov))
            return out

    __prepare_scriptable__ = refuse_torchscript

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def export_normalize(self, cov: torch.Tensor) -> torch.Tensor:
        """`normalize` from ops that both ONNX exporters and torch.export support (for layers whose `normalize` is
        such, `normalize` itself)."""
        return self.normalize(cov)

    def set_exportable(self, enable: bool = True) -> None:
        """Compute `export_normalize` instead of `normalize` (for ONNX export or when asked)."""
        self.exportable = bool_option(self.name, 'exportable', enable)

    @torch.no_grad()
    def check_export_accuracy(self, out: torch.Tensor, exact: torch.Tensor) -> None:
        """Raise ExportAccuracyError where `out` differs from `exact` by more than `export_tolerance` of exact's
        largest entry."""
        scale = exact.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(exact.dtype).tiny)
        error = ((out - exact).abs().amax(dim=(-2, -1)) / scale).nan_to_num(nan=float('inf'))
        off = error > self.export_tolerance
        if off.any():
            raise ExportAccuracyError(
                f'{self.name} export path: differs from the exact layer by up to {error.max().item():.1e} of the '
                f'largest output entry (allowed {self.export_tolerance:.0e}) in {batch_elements(off.tolist())}: '
                f'these covariances lie where its approximation cannot follow the exact layer (eigenvalues far below '
                f'zero, or many at its clamp; docs/models.md#deploying), so an exported model would compute a '
                f'different function. Deploy with torch.export (exact) instead')


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
    """Build the meta-layer registered as `name` with its options, in export mode under timm's
    `set_exportable(True)` layer config (as `timm.create_model(..., exportable=True)` sets it)."""
    if name not in _META_LAYERS:
        raise ValueError(f'Unknown meta-layer {name!r}; known meta-layers: {", ".join(list_meta_layers())}')
    layer = _META_LAYERS[name](**kwargs)
    if is_exportable():
        layer.set_exportable(True)
    return layer
