"""GCP model families registered with timm on import."""
from ._backbone import load_backbone_weights, state_dict_differences
from ._hub_access import WeightsUnavailable, hub_weights
from ._pretrained import HUB_ORG
from .gcp_resnet import GcpResNet
from .gsop_resnet import GSoPResNet
from .idccp_resnet import IDCCP_DEFAULTS
from .gcp_net import FAMILIES, GcpNet
