#!/usr/bin/env python3
"""Train or fine-tune any timm model (GCP or not) with accelerate.

    python train.py                                   # the bundled demo: small GCP model on data/pets-mini
    python train.py --recipe finegrained_448 --data-dir DATA --model gcp_resnet50 --backbone-weights resnet50.a1_in1k
    accelerate launch train.py --recipe imagenet_65ep --data-dir IMAGENET --model gcp_resnet50

Flags: `TrainConfig` below (timm's train.py names); precedence, lowest first: defaults < `--recipe` < `-c/--config`
< the command line. Run folder: metrics.json, summary.csv, checkpoints/, logs/ (TensorBoard), model/ (Hub-ready).
User errors end with one line on stderr and an exit code per kind (timm_gcp.training.errors).
"""
import argparse
import ast
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
import time
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from PIL import Image

# Only the standard library and PyYAML above: torch, timm and accelerate are imported once the flags parse, so that
# `--help` answers at once. Hence the recipes are found without importing timm_gcp.
RECIPES = Path(importlib.util.find_spec('timm_gcp').submodule_search_locations[0]) / 'recipes'
DEFAULT_RECIPE = 'pets_mini'


def list_recipes() -> List[str]:
    """Names of the recipes shipped with timm_gcp (timm_gcp/recipes/*.yaml)."""
    return sorted(path.stem for path in RECIPES.glob('*.yaml'))


def _flag(default: Any, help: str = '', *aliases: str, **argparse_kwargs: Any) -> Any:
    """A TrainConfig field: default, --help text, short aliases and argparse settings beyond those of its type."""
    default_arg = {'default_factory': lambda: type(default)(default)} if isinstance(default, (list, dict)) \
        else {'default': default}
    return field(**default_arg, metadata={'help': help, 'aliases': aliases, 'argparse': argparse_kwargs})


@dataclass
class TrainConfig:
    """Every flag of train.py; defaults follow timm's train.py where it has the flag."""
    # recipe and config
    recipe: Optional[str] = _flag(None, 'named recipe or a YAML path; "none" for bare defaults. Default: the demo '
                                        f'{DEFAULT_RECIPE} when no --data-dir, --dataset or -c is given, else none')
    config: str = _flag('', 'YAML file of flags, applied over the recipe', '-c')
    # data
    data_dir: Optional[str] = _flag(None, 'root holding train/ and val/ image folders (or the HF cache)')
    dataset: str = _flag('', '"" for image folders, hfds/NAME for a Hugging Face dataset')
    train_split: str = 'train'
    val_split: str = 'val'
    img_size: Optional[int] = _flag(None, "input resolution (default: the model's)")
    crop_pct: Optional[float] = _flag(None, "eval centre-crop fraction (default: the model's)")
    interpolation: str = _flag('', "resize interpolation (default: the model's)")
    scale: Optional[List[float]] = _flag(None, 'random-resized-crop area range', nargs=2)
    ratio: Optional[List[float]] = _flag(None, 'random-resized-crop aspect range', nargs=2)
    hflip: float = 0.5
    color_jitter: float = 0.4
    aa: Optional[str] = _flag(None, 'timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1')
    reprob: float = 0.
    workers: int = _flag(min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
                             or 1), 'data-loading processes per training process: 4, or the CPUs this '
                                    'process may use where fewer', '-j')
    max_image_pixels: int = _flag(Image.MAX_IMAGE_PIXELS, "images with more pixels are skipped as unreadable (0: only "
                                                    "PIL's own limit, ~179 M)")
    flip_test: bool = _flag(False, 'evaluate on the mean of the logits of each image and of its mirror image')
    # model
    model: str = 'resnet50'
    pretrained: bool = False
    backbone_weights: Optional[str] = _flag(None, 'initialise a GCP backbone from a plain timm checkpoint of its '
                                                  'architecture (file or timm name)')
    initial_checkpoint: Optional[str] = _flag(None, 'load these weights (strict) after creating the model')
    num_classes: Optional[int] = _flag(None, 'default: the number of classes in the data')
    model_kwargs: Dict[str, Any] = _flag({}, 'extra create_model kwargs k=v')
    drop: Optional[float] = _flag(None, 'dropout before the classifier')
    drop_path: Optional[float] = None
    switch_meta_layer: Optional[str] = _flag(None, 'hybrid protocol: use meta-layer NAME from epoch EPOCH on '
                                                   '(0-based, like decay milestones)', metavar='NAME@EPOCH')
    channels_last: bool = False
    torchcompile: Optional[str] = _flag(None, 'torch.compile backend', nargs='?', const='inductor')
    # optimizer
    opt: str = 'sgd'
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-5
    head_lr_mult: float = _flag(1.0, 'learning-rate multiplier of the classifier')
    clip_grad: Optional[float] = _flag(None, 'clip the gradient norm to this value')
    # schedule
    sched: str = _flag('cosine', 'timm scheduler: cosine, step, multistep, poly, constant, ...')
    epochs: int = 300
    sched_on_updates: bool = False
    decay_milestones: List[int] = _flag([90, 180, 270])
    decay_epochs: float = 90
    decay_rate: float = _flag(0.1, 'step factor, or the power of "poly"')
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.
    cooldown_epochs: int = _flag(0, 'epochs at --min-lr after the schedule, within --epochs; negative: the schedule runs '
                                    'that many epochs past --epochs (a cut-off schedule, e.g. imagenet_30ep_lrfast)')
    # regularisation
    mixup: float = 0.
    cutmix: float = 0.
    mixup_prob: float = 1.
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # run
    batch_size: int = _flag(128, 'per-process batch size', '-b')
    validation_batch_size: Optional[int] = _flag(None, '', '-vb')
    grad_accum_steps: int = 1
    mixed_precision: Optional[str] = _flag(None, 'default: what `accelerate launch` / accelerate config says, else no',
                                           choices=['no', 'fp16', 'bf16'])
    amp: bool = _flag(False, 'timm-style alias for --mixed-precision from --amp-dtype')
    amp_dtype: str = _flag('float16', '', choices=['float16', 'bfloat16'])
    seed: int = 42
    output: Optional[str] = _flag(None, "run directory (default: the resumed run's, else the first free "
                                        "runs/<recipe>-<model>[-N])")
    resume: Optional[str] = _flag(None, 'run directory or checkpoint to continue exactly')
    checkpoint_interval: int = _flag(0, 'also checkpoint every N optimizer updates (0: at epoch ends only)')
    checkpoint_hist: int = _flag(2, 'checkpoints kept')
    log_interval: int = _flag(0, 'print a progress line every N updates (0: never)')
    log_with: str = _flag('tensorboard', 'accelerate tracker(s), or "none"')
    progress: bool = _flag(True, 'tqdm progress bars')
    max_nonfinite_updates: int = _flag(3, 'stop as diverged after this many updates in a row with a non-finite loss')
    debug: bool = _flag(False, 'show the Python traceback of user errors too (or set TIMM_GCP_DEBUG=1)')


_GROUPS = {'recipe': 'recipe and config', 'data_dir': 'data', 'model': 'model', 'opt': 'optimizer',
           'sched': 'schedule', 'mixup': 'regularisation', 'batch_size': 'run'}  # first flag of each --help group
_PATH_FLAGS = ('data_dir', 'output', 'resume', 'initial_checkpoint', 'backbone_weights')  # resolved against a YAML's
# folder; how a published command shows a path flag: by its last component ('name'), or not at all (None)
_PUBLIC_PATH_FLAGS = {'--data-dir': 'name', '--output': None, '--resume': None, '--initial-checkpoint': 'name',
                      '--backbone-weights': 'name', '-c': 'name', '--config': 'name', '--recipe': 'name',
                      '--model': 'name', '--dataset': 'name'}


class _KeyValues(argparse.Action):
    """`k=v ...` as a dict, values read as Python literals where they parse (timm's ParseKwargs, whose import would
    pull in timm and torch before `--help`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if any('=' not in value for value in values if value):
            raise argparse.ArgumentError(self, f'expected key=value pairs, e.g. gcp_dim=64, got {values}')
        pairs = dict(value.split('=', 1) for value in values if value)
        setattr(namespace, self.dest, {key: _literal(value) for key, value in pairs.items()})


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of TrainConfig: one flag per field, typed by its annotation, defaults shown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog=f'recipes: {", ".join(list_recipes())}',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints, group = typing.get_type_hints(TrainConfig), parser
    for f in fields(TrainConfig):
        group = parser.add_argument_group(_GROUPS[f.name]) if f.name in _GROUPS else group
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        kwargs: Dict[str, Any] = {'help': f.metadata.get('help') or '(default: %(default)s)'}
        if kind is bool:
            kwargs['action'] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is dict:
            kwargs.update(nargs='*', action=_KeyValues)
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs='+', type=typing.get_args(kind)[0])
        else:
            kwargs['type'] = kind
        kwargs.update(f.metadata.get('argparse', {}))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        group.add_argument(*f.metadata.get('aliases', ()), '--' + f.name.replace('_', '-'), default=default,
                           **kwargs)
    return parser


def load_recipe(name: str) -> Dict[str, Any]:
    """The flags a bundled recipe or a YAML file sets, keys checked, relative paths made absolute against the
    file's folder (a bundled recipe's: the working directory, for the demo's data/pets-mini)."""
    path = Path(name)
    if path.suffix not in ('.yaml', '.yml'):
        if name not in list_recipes():
            raise ValueError(f'Unknown recipe {name!r}; known recipes: {", ".join(list_recipes())} (or a .yaml path)')
        path = RECIPES / f'{name}.yaml'
    elif not path.is_file():
        raise FileNotFoundError(f'YAML file {path} does not exist')
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f'{path} must hold a mapping of flag names to values, got {type(raw).__name__}')
    base = path.parent if path.parent != RECIPES else Path.cwd()
    known = {f.name for f in fields(TrainConfig)} - {'recipe', 'config'}
    flags = {}
    for key, value in raw.items():
        dest = str(key).replace('-', '_')
        if dest not in known:
            raise ValueError(f'{path}: unknown flag {key!r}; expected names of train.py flags, e.g. batch_size, lr')
        flags[dest] = str((base / value).resolve()) if dest in _PATH_FLAGS and isinstance(value, str) and value \
            else value
    return flags


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """TrainConfig from the command line over a YAML config over a recipe over the defaults; ValueError on a bad
    recipe, config or value."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.recipe is None:
        known.recipe = 'none' if known.data_dir or known.dataset or known.config else DEFAULT_RECIPE
    defaults: Dict[str, Any] = {'recipe': known.recipe}
    for yaml_name in ((known.recipe, known.config) if known.recipe != 'none' else (known.config,)):
        if yaml_name:
            defaults.update(load_recipe(yaml_name))
    parser.set_defaults(**defaults)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.amp and cfg.mixed_precision is None:
        cfg.mixed_precision = 'bf16' if cfg.amp_dtype == 'bfloat16' else 'fp16'
    minimum = {'batch_size': 1, 'epochs': 1, 'grad_accum_steps': 1, 'max_nonfinite_updates': 1, 'max_image_pixels': 0}
    for name, low in minimum.items():
        if getattr(cfg, name) < low:
            raise ValueError(f'--{name.replace("_", "-")} must be >= {low}, got {getattr(cfg, name)}')
    parse_meta_layer_switch(cfg.switch_meta_layer)
    return cfg


def parse_meta_layer_switch(spec: Optional[str]) -> Optional[Tuple[str, int]]:
    """--switch-meta-layer 'svd_pade@45' -> ('svd_pade', 45)."""
    if not spec:
        return None
    match = re.fullmatch(r'([A-Za-z0-9_]+)@(\d+)', spec)
    if match is None:
        raise ValueError(f'--switch-meta-layer expects NAME@EPOCH, e.g. svd_pade@45, got {spec!r}')
    return match.group(1), int(match.group(2))


def launcher() -> List[str]:
    """How this process was started, as a command's first words: `accelerate launch`, `torchrun` (with the process
    count) or `python`."""
    processes, per_node = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    nodes = max(processes // max(per_node, 1), 1)
    if 'ACCELERATE_MIXED_PRECISION' in os.environ:  # set by `accelerate launch` for the processes it starts
        return ['accelerate', 'launch'] + (['--num_processes', str(processes)] if processes > 1 else []) \
            + (['--num_machines', str(nodes)] if nodes > 1 else [])
    if 'TORCHELASTIC_RUN_ID' in os.environ:  # set by torchrun
        return ['torchrun', '--nproc_per_node', str(per_node)] + (['--nnodes', str(nodes)] if nodes > 1 else [])
    return ['python']


def command_line(argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces this run on this machine (local paths included), with the launcher it was started
    with."""
    return shlex.join([*launcher(), 'train.py', *(sys.argv[1:] if argv is None else argv)])


def _public_path(value: str) -> str:
    """A value as a published file may show it: a local path by its last component; a Hub id, a timm name or a
    relative path that is not a file here stays as it is (also behind `local-dir:` and `hfds/`)."""
    if not value:
        return value
    for prefix in ('local-dir:', 'hfds/'):
        if value.startswith(prefix):
            return prefix + _public_path(value[len(prefix):])
    path = Path(value).expanduser()
    return path.resolve().name if path.is_absolute() or path.exists() else value


def public_command(command: str) -> str:
    """`command` (from `command_line`) as published: data, config and weight files by name, no output or resume."""
    tokens = shlex.split(command)
    start = tokens.index('train.py') + 1
    tokens, public, prefix = tokens[start:], [], tokens[:start]
    while tokens:
        flag, eq, value = tokens.pop(0).partition('=')
        if flag not in _PUBLIC_PATH_FLAGS:
            public.append(flag + eq + value)
            continue
        if not eq and tokens:
            value = tokens.pop(0)
        if _PUBLIC_PATH_FLAGS[flag]:
            public += [flag, _public_path(value)]
    return shlex.join([*prefix, *public])


def public_flags(cfg: TrainConfig) -> Dict[str, Any]:
    """The flags that were set, as published: no local paths (data and weight files by name, no output/resume)."""
    flags = {k: v for k, v in dataclasses.asdict(cfg).items()
             if v not in (None, '') and k not in ('config', 'resume', 'output', 'debug', 'workers')}
    for key in ('data_dir', 'dataset', 'initial_checkpoint', 'backbone_weights', 'recipe', 'model'):
        if isinstance(flags.get(key), str):
            flags[key] = _public_path(flags[key])
    return flags


def resolve_run_dir(cfg: TrainConfig, checkpoint: Optional[Path]) -> Path:
    """--output, else the resumed run's folder, else the first free runs/<recipe>-<model>[-N] (chosen before any
    process creates a folder, so every process picks the same one)."""
    if cfg.output:
        return Path(cfg.output)
    if checkpoint is not None:
        return checkpoint.parent.parent
    base = Path('runs') / f'{Path(cfg.recipe).stem}-{cfg.model}'.replace('/', '_').replace(':', '_')
    candidates = (base.with_name(f'{base.name}-{n}') if n > 1 else base for n in itertools.count(1))
    return next(p for p in candidates if not p.exists())


def _config_or_usage_error(argv: Optional[List[str]]) -> TrainConfig:
    try:
        return parse_config(argv)
    except (ValueError, OSError) as err:  # a bad recipe, config file or value: argparse's usage error, exit 2
        build_parser().error(str(err))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train as the flags say; returns the run folder, metrics, final model and data config."""
    return train(_config_or_usage_error(argv), command_line(argv))


def train(cfg: TrainConfig, command: str) -> Dict[str, Any]:
    """The run: config, data, model, optimizer, loop, evaluation, export. SIGINT/SIGTERM end it at once (128 + N)
    outside the training loop, at the next update or epoch end inside it (after a checkpoint)."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from timm_gcp.training.checkpoint import StopSignal, latest_checkpoint, select_checkpoint
    from timm_gcp.training.errors import disk_errors
    from timm_gcp.training.run_lock import own_run_dir
    with StopSignal(defer=False):
        checkpoint, state, skipped = select_checkpoint(cfg.resume) if cfg.resume else (None, None, [])
        run_dir = resolve_run_dir(cfg, checkpoint)
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=None if cfg.log_with == 'none' else cfg.log_with, project_dir=str(run_dir),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        for note in skipped:
            accelerator.print(note, flush=True)
        if skipped:
            accelerator.print(f'resuming from the older intact checkpoint {checkpoint}', flush=True)
        with own_run_dir(accelerator, run_dir, resuming=checkpoint is not None), \
                disk_errors(run_dir, lambda: f'last good checkpoint: {latest_checkpoint(run_dir) or "none"}'):
            return _train(cfg, command, accelerator, run_dir, checkpoint, state)


def create_scheduler(optimizer: Any, cfg: TrainConfig, updates_per_epoch: int) -> Any:
    """timm's scheduler of `--sched` from the flags (timm's names), stepped by the loop once per update and once per
    epoch, never prepared by accelerate (which would step it once per process). `--epochs` includes the cooldown."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    kwargs = {**scheduler_kwargs(cfg), 'num_epochs': cfg.epochs - cfg.cooldown_epochs}
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs, updates_per_epoch=updates_per_epoch)
    if scheduler is None:
        raise ValueError(f'--sched {cfg.sched!r} gives no timm scheduler; for a fixed lr use --sched step '
                         f'--decay-rate 1')
    return scheduler


def _train(cfg: TrainConfig, command: str, accelerator: Any, run_dir: Path, checkpoint: Optional[Path],
           state: Any) -> Dict[str, Any]:
    import torch
    from accelerate.utils import set_seed
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3, trim_summary, update_summary

    from timm_gcp._text import preview
    from timm_gcp.hub import export_model
    from timm_gcp.hub.export import remove_staging
    from timm_gcp.training.checkpoint import (
        Checkpointer, StopSignal, TrainState, check_compatible, consolidate_counters, load_ema)
    from timm_gcp.training.data import create_dataloader, create_datasets, create_transforms
    from timm_gcp.training.errors import EXIT_DATA, EXIT_USAGE, CheckpointError, TrainingDiverged, user_errors
    from timm_gcp.training.evaluate import evaluate
    from timm_gcp.training.loop import base_lr, create_loss, train_one_epoch
    from timm_gcp.training.metrics import finite_or_none, metrics_for_card, write_run_metrics
    from timm_gcp.training.model import (
        check_input_size, check_meta_layer_switch, create_train_model, nonfinite_tensors, param_groups, set_meta_layer)

    def check_finite(model: torch.nn.Module, where: str) -> None:
        bad = nonfinite_tensors(model.state_dict().items())
        if bad:
            raise TrainingDiverged(f'training diverged: {len(bad)} tensors non-finite {where} '
                                   f'({preview(bad, 3)})')

    set_seed(cfg.seed)
    if accelerator.is_main_process:
        remove_staging(run_dir / 'model')  # what an export killed in this run folder left beside it
    switch = parse_meta_layer_switch(cfg.switch_meta_layer)
    accelerator.print(f'recipe: {cfg.recipe}' + (' (the bundled demo)' if cfg.recipe == DEFAULT_RECIPE else ''),
                      flush=True)

    # ---- data (checked before anything is built) -------------------------------------------------------------------
    with user_errors(EXIT_DATA):
        if cfg.recipe == DEFAULT_RECIPE and not Path(cfg.data_dir).is_dir():
            raise FileNotFoundError(f'the demo reads its images from data/pets-mini in the repository, and '
                                    f'{Path.cwd()} has none: run `python train.py` from the repository root (the '
                                    f'folder that holds train.py and data/), or give --data-dir')
        data = create_datasets(cfg.data_dir, cfg.dataset, cfg.train_split, cfg.val_split, seed=cfg.seed,
                               max_image_pixels=cfg.max_image_pixels or None)
    with user_errors(EXIT_USAGE):
        num_classes = cfg.num_classes or len(data.class_names)
        if num_classes < len(data.class_names):
            raise ValueError(f'--num-classes {num_classes} is fewer than the {len(data.class_names)} classes in the '
                             f'data')

        # ---- model, transforms, loaders, loss (every flag checked before any file is written) ------------------------
        model = create_train_model(cfg.model, num_classes, cfg.pretrained, cfg.model_kwargs, cfg.drop,
                                   cfg.drop_path, cfg.initial_checkpoint, cfg.backbone_weights)
        if switch:
            check_meta_layer_switch(model, switch[0])
        data.train.transform, data.val.transform, data_config = create_transforms(model, dataclasses.asdict(cfg))
        check_input_size(model, data_config['input_size'], cfg.model)
        train_loader = create_dataloader(data.train, cfg.batch_size, True, cfg.workers, cfg.seed)
        val_loader = create_dataloader(data.val, cfg.validation_batch_size or cfg.batch_size, False, cfg.workers,
                                       cfg.seed)
        loss_fn, mixup = create_loss(num_classes, cfg.smoothing, cfg.batch_size, mixup_alpha=cfg.mixup,
                                     cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                                     mode=cfg.mixup_mode)
    compat = json.loads(json.dumps({  # what the saved position means, as a checkpoint holds it
        'model': cfg.model, 'num_classes': num_classes, 'class_names': data.class_names,
        'model_kwargs': cfg.model_kwargs, 'train_images': len(data.train), 'batch_size': cfg.batch_size,
        'num_processes': accelerator.num_processes, 'grad_accum_steps': cfg.grad_accum_steps}))
    if checkpoint:
        check_compatible(state.compat, compat, checkpoint)
        if state.epoch > cfg.epochs:
            raise CheckpointError(f'checkpoint {checkpoint} is at epoch {state.epoch}, past --epochs {cfg.epochs}')
        if not accelerator.is_main_process:
            state.reset_counters()  # the checkpoint holds the sum over processes: the main process keeps it
        command = state.command or command  # the command that started the run
    else:
        state = TrainState(compat=compat, command=command)
    if state.meta_layer:
        set_meta_layer([model], state.meta_layer)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimizer and schedule (the timm scheduler is stepped here, once per update: never prepared) --------------
    with user_errors(EXIT_USAGE):
        optimizer = create_optimizer_v2(param_groups(model, cfg.weight_decay, cfg.head_lr_mult), opt=cfg.opt,
                                        lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
        if len(train_loader) == 0:
            raise ValueError(f'the training set has {len(data.train)} images, fewer than one batch of {cfg.batch_size} '
                             f'for each of {accelerator.num_processes} process(es)')
        scheduler = create_scheduler(optimizer, cfg, math.ceil(len(train_loader) / cfg.grad_accum_steps))
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = ModelEmaV3(bare, decay=cfg.model_ema_decay) if cfg.model_ema else None
    if cfg.torchcompile:
        model = torch.compile(model, backend=cfg.torchcompile)

    # ---- resume (every file was validated: nothing below unpickles more than tensors) ----------------------------
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        if ema is not None:
            load_ema(ema, checkpoint)
        scheduler.step_update(num_updates=state.updates)  # rebuilt from the flags: a longer --epochs applies
        accelerator.print(f'resumed from {checkpoint}: epoch {state.epoch}, batch {state.batches_done}, '
                          f'update {state.updates}')
    checkpointer = Checkpointer(accelerator, run_dir, cfg.checkpoint_hist, ema, last=checkpoint)
    accelerator.init_trackers('logs', config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})
    run_info = {'model': cfg.model, 'recipe': cfg.recipe, 'command': command,
                'dataset': cfg.dataset or str(cfg.data_dir), 'num_classes': len(data.class_names),
                'train_images': len(data.train), 'val_images': len(data.val)}
    metrics = write_run_metrics(accelerator, run_dir, run_info, state.history)
    summary_csv = run_dir / 'summary.csv'
    if accelerator.is_main_process:
        trim_summary(str(summary_csv), state.epoch)  # rows past the resumed checkpoint (timm's resume rule)

    # ---- training loop -----------------------------------------------------------------------------------------------
    with StopSignal(defer=True) as stop:
        def on_update() -> bool:
            if cfg.log_interval and state.updates % cfg.log_interval == 0:
                accelerator.print(f'epoch {state.epoch} batch {state.batches_done}/{len(train_loader)} '
                                  f'update {state.updates} lr {base_lr(optimizer):.3g}', flush=True)
            stopping = stop.received_anywhere(accelerator)
            if stopping or (cfg.checkpoint_interval and state.updates % cfg.checkpoint_interval == 0):
                check_finite(bare, f'at epoch {state.epoch} update {state.updates}')
                checkpointer.save(state)
            return stopping

        try:
            for epoch in range(state.epoch, cfg.epochs):
                if switch and epoch >= switch[1] and state.meta_layer != switch[0]:
                    state.meta_layer = switch[0]
                    set_meta_layer([bare, ema.module if ema else None], switch[0])
                    accelerator.print(f'epoch {epoch}: meta-layer switched to {switch[0]}')
                scheduler.step(epoch)
                data.train.set_epoch(epoch)
                train_loader.set_epoch(epoch)
                start = time.time()
                loader = train_loader
                if state.batches_done:
                    loader = accelerator.skip_first_batches(train_loader, state.batches_done)
                train_one_epoch(accelerator, model, optimizer, scheduler, loss_fn, loader, state, len(train_loader),
                                on_update, mixup, ema, cfg.clip_grad, cfg.channels_last, cfg.max_nonfinite_updates,
                                cfg.progress)
                train_time = time.time() - start
                if stop.received_anywhere(accelerator):
                    _exit_interrupted(accelerator, run_dir, command, stop.received)
                check_finite(bare, f'at the end of epoch {epoch} update {state.updates}')

                # ---- evaluation --------------------------------------------------------------------------------------
                consolidate_counters(accelerator, state)
                row = {'epoch': epoch, 'lr': base_lr(optimizer),
                       'meta_layer': state.meta_layer or getattr(bare, 'meta_layer_name', None),
                       'train_loss': state.train_loss_sum / max(state.train_samples, 1),
                       'train_images': state.train_samples, 'unreadable_train': state.unreadable_train,
                       'train_time_s': round(train_time, 2)}
                row.update(evaluate(model, val_loader, accelerator, cfg.flip_test, cfg.channels_last,
                                    cfg.progress))
                if ema is not None:
                    row.update({f'raw_{k}': row[k] for k in ('val_loss', 'top1', 'top5')})
                    row.update(evaluate(ema.module, val_loader, accelerator, cfg.flip_test, cfg.channels_last,
                                        cfg.progress))
                row['epoch_time_s'] = round(time.time() - start, 2)
                state.history.append(finite_or_none(row))
                state.epoch, state.batches_done = epoch + 1, 0
                state.reset_counters()
                checkpointer.save(state)
                metrics = write_run_metrics(accelerator, run_dir, run_info, state.history)
                if accelerator.is_main_process:
                    update_summary(epoch, {'loss': row['train_loss']},
                                   {'loss': row['val_loss'], 'top1': row['top1'], 'top5': row['top5']},
                                   str(summary_csv), lr=row['lr'])
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
                accelerator.print(f'epoch {epoch}: train loss {row["train_loss"]:.4f} | val loss '
                                  f'{row["val_loss"]:.4f} top-1 {row["top1"]:.2f} top-5 {row["top5"]:.2f} '
                                  f'({row["val_images"]} images) | lr {row["lr"]:.3g} | '
                                  f'{row["epoch_time_s"]:.1f}s', flush=True)
                if stop.received_anywhere(accelerator):  # during the evaluation: this epoch's checkpoint is saved
                    _exit_interrupted(accelerator, run_dir, command, stop.received)
        except TrainingDiverged as err:
            accelerator.end_training()
            raise TrainingDiverged(f'{err}; last good checkpoint: '
                                   f'{checkpointer.last or "none (try a lower --lr or --clip-grad)"}') from None

    # ---- export ------------------------------------------------------------------------------------------------------
    final_model = ema.module if ema is not None else bare
    model_dir = run_dir / 'model'
    check_finite(final_model, 'in the final weights')
    if accelerator.is_main_process:
        export_model(final_model, model_dir, label_names=data.class_names, metrics=metrics_for_card(metrics),
                     recipe=public_flags(cfg), command=public_command(command), dataset=_dataset_name(cfg),
                     data_config=data_config, base_model=_base_model(cfg, bare))
        final, best = metrics['final'], metrics['best']
        accelerator.print(f'final (epoch {final["epoch"]}): top-1 {final["top1"]:.2f} top-5 {final["top5"]:.2f}; '
                          f'best (epoch {best["epoch"]}): top-1 {best["top1"]:.2f} top-5 {best["top5"]:.2f}')
        accelerator.print(f'Hub-ready model: {model_dir}')
        push = ['timm-gcp', 'push', str(model_dir), '--repo-id', 'ORG/NAME']
        accelerator.print(f'publish it with: {shlex.join(push)}')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {'run_dir': run_dir, 'metrics': metrics, 'model': final_model, 'data_config': data_config}


def _dataset_name(cfg: TrainConfig) -> str:
    """The dataset as a model card names it: the HF dataset id, or the image folder's name."""
    return cfg.dataset[len('hfds/'):] if cfg.dataset.startswith('hfds/') else Path(cfg.data_dir).resolve().name


def _base_model(cfg: TrainConfig, model: Any) -> Optional[str]:
    """The Hub repo of the weights the run started from (None: from scratch or a local file)."""
    from timm.models import get_pretrained_cfg
    if cfg.pretrained:
        return getattr(model, 'pretrained_cfg', {}).get('hf_hub_id')
    source = cfg.backbone_weights or ''
    if source.startswith('hf-hub:'):
        return source[len('hf-hub:'):]
    if source and not Path(source).exists():  # a timm name, e.g. resnet50.a1_in1k
        return getattr(get_pretrained_cfg(source), 'hf_hub_id', None)
    return None


def _exit_interrupted(accelerator: Any, run_dir: Path, command: str, signum: Optional[int]) -> None:
    accelerator.end_training()
    accelerator.print(f'interrupted: checkpoint saved; continue with: {command} --resume '
                      f'{shlex.quote(str(run_dir))}', flush=True)
    sys.exit(128 + (signum or signal.SIGINT))


def cli(argv: Optional[List[str]] = None) -> int:
    """main() for the command line: a user error becomes one line on stderr and its exit code."""
    cfg = _config_or_usage_error(argv)
    debug = cfg.debug or os.environ.get('TIMM_GCP_DEBUG', '') not in ('', '0')
    try:
        train(cfg, command_line(argv))
    except KeyboardInterrupt as err:  # a signal outside the training loop: `Interrupted`, or SIGINT's default
        print('train.py: interrupted', file=sys.stderr)
        return 128 + getattr(err, 'signum', signal.SIGINT)
    except Exception as err:
        from timm_gcp.training.errors import exit_code_of  # imported here: `--help` stays quick
        code = exit_code_of(err)
        if code is None or debug:
            raise
        print(f'train.py: error: {err}', file=sys.stderr)
        return code
    return 0


if __name__ == '__main__':
    sys.exit(cli())
