"""Hub tooling: export a Hub-ready folder, model cards, push, verify, convert official checkpoints, the catalogue."""
from .catalogue import CatalogueEntry, load_catalogue, render_table
from .convert import convert_checkpoint
from .export import CARD_NAME, CONFIG_NAME, EXPORT_FILES, WEIGHTS_NAME, export_model, export_model_args
from .model_card import CardInfo, build_model_card, card_metrics
from .push import PushResult, push_model
from .verify import VerificationError, VerifyReport, verify_repo
