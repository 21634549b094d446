"""Global covariance pooling: 1x1 reduction, covariance, meta-layer, upper-triangular vectorisation."""
import inspect
from typing import Any, Dict, Optional, Sequence

import torch
from timm.layers import register_notrace_module
from torch import nn

from ..meta_layers import create_meta_layer
from ..ops import (
    NonFiniteCovarianceError, autocast_enabled, covariance, refuse_torchscript, triu_flat_index, triu_vec)
from .channel_dropout import AdaptiveChannelDropout
from .compact import ProgressiveReduction, RowGroupConv
from .gaussian import GaussianEmbedding
from .stiefel import StiefelCompression
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
    """(B, C, H, W) -> (B, dim(dim+1)/2) second-order features (other sizes with the options below: `out_features`).

    The covariance and meta-layer compute in float32 (float64 for float64 input); the output is float32 under
    autocast and otherwise takes the input's dtype (a pure bf16/fp16 model gets bf16/fp16 features).
    `dim=None` skips the 1x1 conv + BN + ReLU reduction and pools the `in_chs` channels directly.
    `dropcov=True` applies DropCov's adaptive channel dropout to the reduced features before the covariance
    (training only; pair it with `meta_layer='cov'` for DropCov as published).
    `gaussian=True` pools the (dim+1) x (dim+1) global Gaussian embedding [[Σ + μμᵀ, μ], [μᵀ, 1]] instead of Σ
    (G2DeNet / MPN-COV journal version). `progressive_widths=[1024, 512]` reduces through 1x1 conv-BN-ReLU stages of
    those widths before the reduction to `dim`; `compress_dim=k` projects the matrix to WᵀΣW, W (n x k) orthonormal,
    before the meta-layer (IDCCP); `group_conv=e` replaces the triu vector by a row-wise group convolution of the
    normalised matrix, e filters per row (MPN-COV journal version's compact head).
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
            gaussian: bool = False,
            progressive_widths: Optional[Sequence[int]] = None,
            compress_dim: Optional[int] = None,
            group_conv: Optional[int] = None,
            riemannian: str = 'pow_emlr',
    ):
        super().__init__()
        if isinstance(in_chs, bool) or not isinstance(in_chs, int) or in_chs < 1:
            raise ValueError(f'GCPPool in_chs must be a positive int channel count, got {in_chs!r}')
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f'GCPPool dim must be a positive int channel count or None, got {dim!r}')
        if progressive_widths is not None and dim is None:
            raise ValueError('GCPPool progressive_widths needs a final reduction: give dim too')
        if not isinstance(gaussian, bool):
            raise ValueError(f'gaussian must be True or False, got {gaussian!r}')
        self.dim = in_chs if dim is None else dim
        self.progressive = nn.Identity() if progressive_widths is None else ProgressiveReduction(
            in_chs, progressive_widths)
        self.progressive_widths = progressive_widths
        if dim is None:
            self.conv, self.bn, self.act = nn.Identity(), nn.Identity(), nn.Identity()
        else:
            self.conv = nn.Conv2d(progressive_widths[-1] if progressive_widths else in_chs, dim, kernel_size=1,
                                  bias=False)
            self.bn = nn.BatchNorm2d(dim)
            self.act = nn.ReLU(inplace=True)
            nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        self.channel_dropout = AdaptiveChannelDropout() if dropcov else nn.Identity()
        self.gaussian_embedding = GaussianEmbedding() if gaussian else None
        size = self.dim + gaussian
        self.compression = None if compress_dim is None else StiefelCompression(size, compress_dim)
        self.group_conv = group_conv
        self.row_conv = None if group_conv is None else RowGroupConv(compress_dim or size, group_conv)
        # a constant index for tracers and exporters (which cannot export triu_indices); not in checkpoints
        self.register_buffer('triu_index', triu_flat_index(self.matrix_size), persistent=False)
        self.riemannian_map = RiemannianMap(riemannian)
        self.set_meta_layer(meta_layer, **(meta_layer_kwargs or {}))

    @property
    def matrix_size(self) -> int:
        """Size of the matrix the meta-layer normalises: dim, +1 with `gaussian`, `compress_dim` if set."""
        return self.compress_dim or self.dim + self.gaussian

    @property
    def out_features(self) -> int:
        return self.row_conv.out_features if self.row_conv is not None else gcp_feature_dim(self.matrix_size)

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
        self.triu_index.copy_(triu_flat_index(self.matrix_size, self.triu_index.device))

    @property
    def dropcov(self) -> bool:
        return isinstance(self.channel_dropout, AdaptiveChannelDropout)

    @property
    def gaussian(self) -> bool:
        return self.gaussian_embedding is not None

    @property
    def compress_dim(self) -> Optional[int]:
        return None if self.compression is None else self.compression.dim

    @property
    def riemannian(self) -> str:
        return self.riemannian_map.name

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_dropout(self.act(self.bn(self.conv(self.progressive(x)))))

    def second_order(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) reduced features -> the matrix the meta-layer normalises."""
        matrix = covariance(x) if self.gaussian_embedding is None else self.gaussian_embedding(x)
        return matrix if self.compression is None else self.compression(matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            normalised = self.riemannian_map(self.meta_layer(self.second_order(self.reduce(x))), self.meta_layer.power)
            pooled = triu_vec(normalised, self.triu_index) if self.row_conv is None else self.row_conv(normalised)
        except NonFiniteCovarianceError as err:
            raise NonFiniteCovarianceError(
                f'GCPPool: the covariance of its (B, {self.dim}, H, W) reduced features is non-finite, so the features '
                f'it was given (the backbone output) hold NaN/Inf or values that overflow float32, e.g. after a '
                f'diverged training run or from non-finite input images. {err}') from None
        return pooled if autocast_enabled(x) else pooled.to(x.dtype)


HEAD_OPTIONS = ('dropcov', 'riemannian', 'gaussian', 'progressive_widths', 'compress_dim', 'group_conv')
"""GCPPool's keyword options beyond the reduction width and the meta-layer. Each is also a model kwarg of every GCP
model (`timm.create_model('gcp_resnet50', dropcov=True)`), passed to its head and recorded in its config.json: a new
head option is a keyword of GCPPool, an attribute of the same name, and its name here."""


def head_option_defaults() -> Dict[str, Any]:
    """`HEAD_OPTIONS` with GCPPool's defaults."""
    parameters = inspect.signature(GCPPool.__init__).parameters
    return {name: parameters[name].default for name in HEAD_OPTIONS}
