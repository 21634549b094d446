"""Command-line flags (timm's train.py names), named YAML recipes and YAML config files.

Precedence, lowest first: flag defaults < `--recipe NAME` < `-c/--config FILE` < flags on the command line. Keys in a
YAML file are flag names (`batch_size` or `batch-size`); relative paths in it resolve against the file's folder.
The demo recipe applies only to a command that names no data, recipe or config: a user's data never inherits it.
"""
import argparse
import itertools
import re
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

from .data import MAX_IMAGE_PIXELS

__all__ = ['RECIPES', 'DEFAULT_RECIPE', 'build_parser', 'parse_args', 'list_recipes', 'load_recipe',
           'parse_meta_layer_switch', 'command_line', 'public_command', 'resolve_run_dir',
           'public_flags', 'scalar_flags', 'dataset_name']

RECIPES = resources.files('timm_gcp') / 'recipes'  # package data: present in any install
DEFAULT_RECIPE = 'pets_mini'
_PATH_KEYS = ('data_dir', 'output', 'resume', 'initial_checkpoint', 'backbone_weights')
# how a published command shows each path flag: by its last component ('name'), or not at all (None)
_PUBLIC_PATH_FLAGS = {'--data-dir': 'name', '--output': None, '--resume': None, '--initial-checkpoint': 'name',
                      '--backbone-weights': 'name', '-c': 'name', '--config': 'name', '--recipe': 'name',
                      '--model': 'name', '--dataset': 'name'}


def build_parser() -> argparse.ArgumentParser:
    """All flags of train.py; defaults follow timm's train.py where it has the flag."""
    p = argparse.ArgumentParser(description='Train or fine-tune any timm model (GCP or not) with accelerate.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    g = p.add_argument_group('recipe and config')
    g.add_argument('--recipe', default=None,
                   help=f'named recipe ({", ".join(list_recipes())}) or a YAML path; "none" for bare defaults. '
                        f'Default: the demo {DEFAULT_RECIPE} when no --data-dir, --dataset or -c is given, else none')
    g.add_argument('-c', '--config', default='', help='YAML file of flags, applied over the recipe')

    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None, help='root holding train/ and val/ image folders (or the HF cache)')
    g.add_argument('--dataset', default='', help='"" for image folders, hfds/NAME for a Hugging Face dataset')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='val')
    g.add_argument('--img-size', type=int, default=None, help='input resolution (default: the model\'s)')
    g.add_argument('--crop-pct', type=float, default=None, help='eval centre-crop fraction (default: the model\'s)')
    g.add_argument('--interpolation', default='', help='resize interpolation (default: the model\'s)')
    g.add_argument('--scale', type=float, nargs=2, default=None, help='random-resized-crop area range')
    g.add_argument('--ratio', type=float, nargs=2, default=None, help='random-resized-crop aspect range')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default=None, help='timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--workers', '-j', type=int, default=4)
    g.add_argument('--max-image-pixels', type=int, default=MAX_IMAGE_PIXELS,
                   help='images with more pixels are skipped as unreadable (0: only PIL\'s own limit, ~179 M)')
    g.add_argument('--flip-test', action=argparse.BooleanOptionalAction, default=False,
                   help='evaluate on the average of the logits of each image and its mirror image')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='resnet50')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--backbone-weights', default=None,
                   help='initialise a GCP backbone from a plain timm checkpoint of its architecture '
                        '(file or timm name)')
    g.add_argument('--initial-checkpoint', default=None, help='load these weights (strict) after creating the model')
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of classes in the data')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model kwargs k=v')
    g.add_argument('--drop', type=float, default=None, help='dropout before the classifier')
    g.add_argument('--drop-path', type=float, default=None)
    g.add_argument('--switch-meta-layer', default=None, metavar='NAME@EPOCH',
                   help='hybrid protocol: use meta-layer NAME from epoch EPOCH on (0-based, like decay milestones)')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')

    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--lr', type=float, default=0.1)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--head-lr-mult', type=float, default=1.0, help='learning-rate multiplier of the classifier')
    g.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')

    g = p.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine', help='timm scheduler: cosine, step, multistep, poly, constant, ...')
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--decay-rate', type=float, default=0.1, help='step factor, or the power of "poly"')
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.)
    g.add_argument('--cooldown-epochs', type=int, default=0)

    g = p.add_argument_group('regularisation')
    g.add_argument('--mixup', type=float, default=0.)
    g.add_argument('--cutmix', type=float, default=0.)
    g.add_argument('--mixup-prob', type=float, default=1.)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)

    g = p.add_argument_group('run')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per-process batch size')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--mixed-precision', choices=['no', 'fp16', 'bf16'], default=None,
                   help='default: what `accelerate launch` / accelerate config says, else no')
    g.add_argument('--amp', action='store_true', help='timm-style alias for --mixed-precision from --amp-dtype')
    g.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default='float16')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--output', default=None,
                   help='run directory (default: the resumed run\'s, else the first free runs/<recipe>-<model>[-N])')
    g.add_argument('--resume', default=None, help='run directory or checkpoint to continue exactly')
    g.add_argument('--checkpoint-interval', type=int, default=0,
                   help='also checkpoint every N optimizer updates (0: at epoch ends only)')
    g.add_argument('--checkpoint-hist', type=int, default=2, help='checkpoints kept')
    g.add_argument('--log-interval', type=int, default=0, help='print a progress line every N updates (0: never)')
    g.add_argument('--log-with', default='tensorboard', help='accelerate tracker(s), or "none"')
    g.add_argument('--no-progress', action='store_true', help='no tqdm bars')
    g.add_argument('--max-nonfinite-updates', type=int, default=3,
                   help='stop as diverged after this many updates in a row with a non-finite loss')
    g.add_argument('--debug', action='store_true',
                   help='show the Python traceback of user errors too (or set TIMM_GCP_DEBUG=1)')
    for action in p._actions:  # argparse prints defaults only for flags with a help text
        if action.help is None:
            action.help = '(default: %(default)s)'
    return p


def list_recipes() -> List[str]:
    """Names of the recipes shipped with the package (timm_gcp/recipes/*.yaml)."""
    return sorted(entry.name[:-len('.yaml')] for entry in RECIPES.iterdir() if entry.name.endswith('.yaml'))


def _yaml_file(path: Path) -> Tuple[str, str, Path]:
    """(YAML text, how messages name it, the folder its relative paths resolve against)."""
    if not path.is_file():
        raise FileNotFoundError(f'YAML file {path} does not exist')
    return path.read_text(), str(path), path.parent


def _recipe(name: str) -> Tuple[str, str, Path]:
    """`_yaml_file` of a recipe YAML path or of a bundled recipe, whose relative paths resolve against the working
    directory (the repository root, for the demo's data/pets-mini)."""
    if Path(name).suffix in ('.yaml', '.yml'):
        return _yaml_file(Path(name))
    if name not in list_recipes():
        raise ValueError(f'Unknown recipe {name!r}; known recipes: {", ".join(list_recipes())} (or a .yaml path)')
    return (RECIPES / f'{name}.yaml').read_text(), f'recipe {name}', Path.cwd()


def _load_yaml_flags(yaml_source: Tuple[str, str, Path], parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Flags from a YAML mapping, keys normalised to argparse dests and checked, paths made absolute."""
    text, source, base = yaml_source
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ValueError(f'{source} must hold a mapping of flag names to values, got {type(raw).__name__}')
    known = {action.dest for action in parser._actions}
    flags = {}
    for key, value in raw.items():
        dest = str(key).replace('-', '_')
        if dest not in known or dest in ('recipe', 'config', 'help'):
            raise ValueError(f'{source}: unknown flag {key!r}; expected names of train.py flags, e.g. batch_size, lr')
        if dest in _PATH_KEYS and isinstance(value, str) and value:
            value = str((base / value).resolve())
        flags[dest] = value
    return flags


def load_recipe(name: str) -> Dict[str, Any]:
    """The flags a named recipe (or recipe YAML path) sets."""
    return _load_yaml_flags(_recipe(name), build_parser())


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags with recipe and config YAML applied underneath the command line."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.recipe is None:
        known.recipe = 'none' if known.data_dir or known.dataset or known.config else DEFAULT_RECIPE
    defaults: Dict[str, Any] = {'recipe': known.recipe}
    if known.recipe != 'none':
        defaults.update(_load_yaml_flags(_recipe(known.recipe), parser))
    if known.config:
        defaults.update(_load_yaml_flags(_yaml_file(Path(known.config)), parser))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.amp and args.mixed_precision is None:
        args.mixed_precision = 'bf16' if args.amp_dtype == 'bfloat16' else 'fp16'
    if args.max_image_pixels == 0:
        args.max_image_pixels = None
    for flag in ('batch_size', 'epochs', 'grad_accum_steps', 'max_nonfinite_updates'):
        if getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be >= 1, got {getattr(args, flag)}')
    return args


def parse_meta_layer_switch(spec: Optional[str]) -> Optional[Tuple[str, int]]:
    """'svd_pade@45' -> ('svd_pade', 45)."""
    if not spec:
        return None
    match = re.fullmatch(r'([A-Za-z0-9_]+)@(\d+)', spec)
    if match is None:
        raise ValueError(f'--switch-meta-layer expects NAME@EPOCH, e.g. svd_pade@45, got {spec!r}')
    return match.group(1), int(match.group(2))


def command_line(argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces this run on this machine (local paths included)."""
    return shlex.join(['python', 'train.py', *(sys.argv[1:] if argv is None else argv)])


def _public_path(value: str) -> str:
    """A value as a published file may show it: a local path by its last component; a Hub id, a timm name or a
    relative path that is not a file here stays as it is (also behind `local-dir:` and `hfds/`)."""
    for prefix in ('local-dir:', 'hfds/'):
        if value.startswith(prefix):
            return prefix + _public_path(value[len(prefix):])
    path = Path(value).expanduser()
    return path.resolve().name if path.is_absolute() or path.exists() else value


def public_command(command: str) -> str:
    """`command` (from `command_line`) as published: data, config and weight files by name, no output or resume."""
    tokens, public = shlex.split(command)[2:], []
    while tokens:
        flag, eq, value = tokens.pop(0).partition('=')
        if flag not in _PUBLIC_PATH_FLAGS:
            public.append(flag + eq + value)
            continue
        if not eq and tokens:
            value = tokens.pop(0)
        if _PUBLIC_PATH_FLAGS[flag]:
            public += [flag, _public_path(value)]
    return shlex.join(['python', 'train.py', *public])


def resolve_run_dir(args: argparse.Namespace, checkpoint: Optional[Path]) -> Path:
    """--output, else the resumed run's folder, else the first free runs/<recipe>-<model>[-N].

    Chosen before any process creates a folder, so every process picks the same one.
    """
    if args.output:
        run_dir = Path(args.output)
    elif checkpoint is not None:
        run_dir = checkpoint.parent.parent
    else:
        base = Path('runs') / f'{Path(args.recipe).stem}-{args.model}'.replace('/', '_').replace(':', '_')
        run_dir = next(p for p in (base.with_name(f'{base.name}-{n}') if n > 1 else base for n in itertools.count(1))
                       if not p.exists())
    return run_dir


def public_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags that were set, as published: no local paths (data and weight files by name, no output/resume)."""
    flags = {k: v for k, v in vars(args).items()
             if v is not None and k not in ('config', 'resume', 'output', 'debug')}
    for key in ('data_dir', 'dataset', 'initial_checkpoint', 'backbone_weights', 'recipe', 'model'):
        if isinstance(flags.get(key), str):
            flags[key] = _public_path(flags[key])
    return flags


def scalar_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags with a scalar value (what trackers such as TensorBoard record as hyper-parameters)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def dataset_name(args: argparse.Namespace) -> str:
    """The dataset as a model card names it: the HF dataset id, or the image folder's name."""
    return args.dataset[len('hfds/'):] if args.dataset.startswith('hfds/') else Path(args.data_dir).resolve().name
