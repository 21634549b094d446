"""Hub tooling: export, push, verify, convert official checkpoints, the catalogue and the `timm-gcp` command."""
from .export import export_model
