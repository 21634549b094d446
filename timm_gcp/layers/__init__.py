from .channel_dropout import AdaptiveChannelDropout
from .gcp_pool import HEAD_OPTIONS, GCPPool, gcp_feature_dim, head_option_defaults
from .gsop import GSoPBlock
from .riemannian import RIEMANNIAN_MAPS, RiemannianMap
