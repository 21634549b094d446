from .channel_dropout import AdaptiveChannelDropout
from .gcp_pool import GCPPool, gcp_feature_dim
from .gsop import GSoPBlock
