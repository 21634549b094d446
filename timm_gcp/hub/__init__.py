"""Hub tooling: export a Hub-ready folder, model cards, push, verify, convert official checkpoints, the catalogue,
and the `timm-gcp` command (cli.py)."""
from .catalogue import CatalogueEntry, check_registry, load_catalogue, render_table
from .convert import convert_checkpoint
from .export import (CARD_NAME, CONFIG_NAME, EXPORT_FILES, WEIGHTS_NAME, check_export_dir, export_model,
                     export_model_args)
from .model_card import CardInfo, build_model_card, card_metrics
from .publishable import check_finite_metrics, check_finite_tensors, check_no_local_paths, check_repo_id
from .push import PushResult, push_model
from .verify import VerificationError, VerifyReport, verify_folder, verify_repo
