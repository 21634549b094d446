"""What train.py composes: flags and recipes, data, model set-up, the loop, checkpoints, metrics and plots."""
from .checkpoint import (
    Checkpointer, StopSignal, TrainState, check_compatible, consolidate_counters, find_checkpoint, read_train_state)
from .config import (
    DEFAULT_RECIPE, RECIPE_DIR, build_parser, command_line, list_recipes, load_recipe, parse_args,
    parse_meta_layer_switch)
from .data import DataBundle, create_dataloader, create_datasets, create_transforms, find_classes, to_rgb
from .loop import TrainComponents, evaluate, predict, train_one_epoch
from .metrics import summarize, topk_correct, write_json
from .model import check_meta_layer_switch, create_train_model, param_groups, plain_model, set_meta_layer
from .plots import plot_curves
