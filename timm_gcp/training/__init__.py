"""What train.py composes: flags and recipes, data, model set-up, optimizer and schedule, the loop, checkpoints,
run lock, user errors, evaluation and metrics."""
from .checkpoint import (
    Checkpointer, StopSignal, TrainState, check_compatible, consolidate_counters, find_checkpoint, load_ema,
    read_train_state, select_checkpoint, validate_checkpoint)
from .config import (
    DEFAULT_RECIPE, RECIPES, build_parser, command_line, dataset_name, list_recipes,
    load_recipe, parse_args, parse_meta_layer_switch, public_command, public_flags, resolve_run_dir, scalar_flags)
from .data import (
    MAX_IMAGE_PIXELS, create_dataloader, create_datasets, create_eval_dataset, create_transforms, to_rgb)
from .errors import (
    EXIT_CHECKPOINT, EXIT_DATA, EXIT_DIVERGED, EXIT_OUTPUT_IN_USE, EXIT_USAGE, CheckpointError, OutputInUse,
    TrainingDiverged, exit_code_of, user_errors)
from .evaluate import evaluate, predict, topk_correct
from .loop import TrainComponents, base_lr, create_loss, train_one_epoch
from .metrics import finite_or_none, metrics_for_card, write_run_metrics
from .model import check_input_size, check_meta_layer_switch, create_train_model, nonfinite_tensors, set_meta_layer
from .optim import create_train_scheduler, param_groups
from .run_lock import RunLock, own_run_dir
