"""Global covariance pooling: 1x1 reduction, covariance, meta-layer, upper-triangular vectorisation."""
import inspect
from typing import Any, Dict, Optional

import torch
from timm.layers import register_notrace_module
from torch import nn

from ..meta_layers import create_meta_layer
from ..ops import (
    NonFiniteCovarianceError, autocast_enabled, covariance, refuse_torchscript, triu_flat_index, triu_vec)
from .channel_dropout import AdaptiveChannelDropout
from .riemannian import RiemannianMap

__all__ = ['GCPPool', 'HEAD_OPTIONS', 'gcp_feature_dim', 'head_option_defaults']


def gcp_feature_dim(dim: int) -> int:
    """Length of the triu vector of a dim x dim covariance: dim(dim+1)/2."""
    return dim * (dim + 1) // 2


MPN_COV_BIBTEX = """@inproceedings{li2017second,
  title={Is Second-order Information Helpful for Large-scale Visual Recognition?},
  author={Li, Peihua and Xie, Jiangtao and Wang, Qilong and Zuo, Wangmeng},
  booktitle={IEEE International Conference on Computer Vision (ICCV)},
  year={2017}
}"""

@register_notrace_module  # a leaf for torch.fx (timm's feature extraction): its checks stay in the graph
class GCPPool(nn.Module):
    """(B, C, H, W) -> (B, dim(dim+1)/2) second-order features.

    The covariance and meta-layer compute in float32 (float64 for float64 input); the output is float32 under
    autocast and otherwise takes the input's dtype (a pure bf16/fp16 model gets bf16/fp16 features).
    `dim=None` skips the 1x1 conv + BN + ReLU reduction and pools the `in_chs` channels directly.
    `dropcov=True` applies DropCov's adaptive channel dropout to the reduced features before the covariance
    (training only; pair it with `meta_layer='cov'` for DropCov as published).
    `riemannian` maps the meta-layer output M = Σ^θ before the triu vector (`RiemannianMap`, RiemGCP): 'pow_emlr' (M
    itself, the default), 'scalepow_emlr', 'pow_tmlr', 'chol_tmlr' or 'log_emlr'.
    A non-finite covariance raises `timm_gcp.ops.NonFiniteCovarianceError` saying the features fed to the head are
    non-finite; `torch.jit.script` raises a RuntimeError (use torch.compile).
    """
    pool_type = 'gcp'
    __prepare_scriptable__ = refuse_torchscript
    papers = (MPN_COV_BIBTEX,)  # BibTeX, cited by model cards (as MetaLayer.papers)

    def __init__(
            self,
            in_chs: int,
            dim: Optional[int] = 256,
            meta_layer: str = 'isqrt',
            meta_layer_kwargs: Optional[Dict[str, Any]] = None,
            dropcov: bool = False,
            riemannian: str = 'pow_emlr',
    ):
        super().__init__()
        if isinstance(in_chs, bool) or not isinstance(in_chs, int) or in_chs < 1:
            raise ValueError(f'GCPPool in_chs must be a positive int channel count, got {in_chs!r}')
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f'GCPPool dim must be a positive int channel count or None, got {dim!r}')
        self.dim = in_chs if dim is None else dim
        if dim is None:
            self.conv, self.bn, self.act = nn.Identity(), nn.Identity(), nn.Identity()
        else:
            self.conv = nn.Conv2d(in_chs, dim, kernel_size=1, bias=False)
            self.bn = nn.BatchNorm2d(dim)
            self.act = nn.ReLU(inplace=True)
            nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        self.channel_dropout = AdaptiveChannelDropout() if dropcov else nn.Identity()
        # a constant index for tracers and exporters (which cannot export triu_indices); not in checkpoints
        self.register_buffer('triu_index', triu_flat_index(self.dim), persistent=False)
        self.riemannian_map = RiemannianMap(riemannian)
        self.set_meta_layer(meta_layer, **(meta_layer_kwargs or {}))

    @property
    def out_features(self) -> int:
        return gcp_feature_dim(self.dim)

    @property
    def options(self) -> Dict[str, Any]:
        """Its `HEAD_OPTIONS` and their values."""
        return {name: getattr(self, name) for name in HEAD_OPTIONS}

    def set_meta_layer(self, name: str, **kwargs) -> None:
        """Swap the matrix normalisation (same parameters, different function: the hybrid protocol); a head in
        export mode stays in it."""
        exportable = getattr(self, 'meta_layer', None) is not None and self.meta_layer.exportable
        meta_layer = create_meta_layer(name, **kwargs)
        self.riemannian_map.check_meta_layer(meta_layer)
        if exportable:
            meta_layer.set_exportable(True)
        self.meta_layer = meta_layer
        self.meta_layer_name = name
        self.meta_layer_kwargs = dict(kwargs)

    def init_non_persistent_buffers(self) -> None:
        """Recompute `triu_index` (timm's hook after `to_empty()`)."""
        self.triu_index.copy_(triu_flat_index(self.dim, self.triu_index.device))

    @property
    def dropcov(self) -> bool:
        return isinstance(self.channel_dropout, AdaptiveChannelDropout)

    @property
    def riemannian(self) -> str:
        return self.riemannian_map.name

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_dropout(self.act(self.bn(self.conv(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            pooled = triu_vec(self.riemannian_map(self.meta_layer(covariance(self.reduce(x))), self.meta_layer.power),
                              self.triu_index)
        except NonFiniteCovarianceError as err:
            raise NonFiniteCovarianceError(
                f'GCPPool: the covariance of its (B, {self.dim}, H, W) reduced features is non-finite, so the features '
                f'it was given (the backbone output) hold NaN/Inf or values that overflow float32, e.g. after a '
                f'diverged training run or from non-finite input images. {err}') from None
        return pooled if autocast_enabled(x) else pooled.to(x.dtype)


HEAD_OPTIONS = ('dropcov', 'riemannian')
"""GCPPool's keyword options beyond the reduction width and the meta-layer. Each is also a model kwarg of every GCP
model (`timm.create_model('gcp_resnet50', dropcov=True)`), passed to its head and recorded in its config.json: a new
head option is a keyword of GCPPool, an attribute of the same name, and its name here."""


def head_option_defaults() -> Dict[str, Any]:
    """`HEAD_OPTIONS` with GCPPool's defaults."""
    parameters = inspect.signature(GCPPool.__init__).parameters
    return {name: parameters[name].default for name in HEAD_OPTIONS}
