"""What train.py composes: flags and recipes, data, model set-up, optimizer and schedule, the loop, checkpoints,
metrics and plots."""
from .checkpoint import (
    Checkpointer, StopSignal, TrainState, check_compatible, consolidate_counters, find_checkpoint, read_train_state)
from .config import (
    DEFAULT_RECIPE, RECIPE_DIR, build_parser, command_line, list_recipes, load_recipe, parse_args,
    dataset_name, effective_flags, parse_meta_layer_switch, resolve_run_dir, scalar_flags)
from .data import DataBundle, create_dataloader, create_datasets, create_transforms, find_classes, to_rgb
from .loop import TrainComponents, base_lr, create_loss, evaluate, train_one_epoch
from .metrics import card_metrics, summarize, write_json, write_run_metrics
from .model import check_meta_layer_switch, create_train_model, param_groups, plain_model, set_meta_layer
from .optim import create_train_optimizer, create_train_scheduler
from .plots import plot_curves
