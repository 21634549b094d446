from .channel_dropout import AdaptiveChannelDropout
from .compact import ProgressiveReduction, RowGroupConv
from .gaussian import GaussianEmbedding, gaussian_embedding
from .gcp_pool import HEAD_OPTIONS, GCPPool, gcp_feature_dim, head_option_defaults
from .gsop import GSoPBlock
from .invariance import GROUPS, GroupInvariance, group_transforms
from .riemannian import RIEMANNIAN_MAPS, RiemannianMap
from .stiefel import StiefelCompression, orthonormal_columns
