from .gcp_pool import GCPHead, GCPPool, gcp_feature_dim
from .gsop import GSoPBlock
