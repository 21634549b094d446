"""timm-gcp: global covariance pooling for timm. Importing it registers the GCP models with timm."""
from .ops import covariance, triu_vec
from .meta_layers import ExportAccuracyError, MetaLayer, create_meta_layer, list_meta_layers, register_meta_layer
from .layers import GCPPool, GSoPBlock
from .models import FAMILIES, HUB_ORG, GcpNet, GcpResNet, GSoPResNet, load_backbone_weights

__version__ = '0.1.0'
