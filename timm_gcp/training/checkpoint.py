"""Atomic, validated, resumable checkpoints of a whole run, and stopping on SIGINT/SIGTERM.

A checkpoint is `accelerator.save_state` (model as safetensors, optimizer, AMP scaler, RNG state of every process),
the EMA weights as `ema.safetensors`, and `trainer_state.json` (position in the run, meta-layer in use, metrics so far,
what the checkpoint is compatible with, and the size and SHA-256 of every other file). Nothing in it is pickled
objects: tensors and plain containers are read with `torch.load(weights_only=True)`, the rest is safetensors or JSON.
The timm scheduler is not saved: it is rebuilt from the flags and set to the saved position.

A checkpoint is written to a hidden temporary folder and renamed into place, so a folder named `checkpoint-*` is
complete; before anything is restored, every file of the checkpoint is checked, and a corrupt one is skipped for the
next older intact checkpoint. Older checkpoints are pruned only after a new one has been written.
"""
import json
import math
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from huggingface_hub.utils.sha import sha_fileobj
from safetensors.torch import load_file, load_model, save_model

from .errors import CheckpointError
from .metrics import finite_or_none

__all__ = ['TrainState', 'Checkpointer', 'find_checkpoint', 'select_checkpoint', 'validate_checkpoint',
           'read_train_state', 'check_compatible', 'load_ema', 'StopSignal', 'consolidate_counters']

STATE_FILE = 'trainer_state.json'
EMA_FILE = 'ema.safetensors'
_NAME = re.compile(r'checkpoint-u(\d+)-e(\d+)')
_RNG_KEYS = ('random_state', 'numpy_random_seed', 'torch_manual_seed')


@dataclass
class TrainState:
    """Where a run stands: `epoch` in progress (0-based), its `batches_done`, optimizer `updates` so far; `command`
    is the command that started the run."""
    epoch: int = 0
    batches_done: int = 0
    updates: int = 0
    meta_layer: Optional[str] = None
    train_loss_sum: float = 0.
    train_samples: int = 0
    unreadable_train: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    compat: Dict[str, Any] = field(default_factory=dict)
    command: Optional[str] = None

    def to_json(self, files: Optional[Dict[str, Any]] = None) -> str:
        """Strict JSON: a running loss sum that overflowed (a skipped fp16 update) is written as null."""
        return json.dumps(finite_or_none({**asdict(self), 'files': files or {}}), indent=2, allow_nan=False)

    def reset_counters(self) -> None:
        """Zero the running training counters (at an epoch's end, and on every process but the main one)."""
        self.train_loss_sum, self.train_samples, self.unreadable_train = 0., 0, 0


def consolidate_counters(accelerator: Any, state: TrainState) -> None:
    """Sum the per-process running counters of `state` into the main process (zero elsewhere)."""
    local = torch.tensor([state.train_loss_sum, state.train_samples, state.unreadable_train],
                         dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, 'sum') if accelerator.num_processes > 1 else local
    if not accelerator.is_main_process:
        state.reset_counters()
        return
    loss_sum, samples, unreadable = total.tolist()
    state.train_loss_sum, state.train_samples, state.unreadable_train = loss_sum, int(samples), int(unreadable)


def _read_state_file(checkpoint_dir: Path) -> Tuple[TrainState, Dict[str, Any]]:
    path = Path(checkpoint_dir) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        files = raw.pop('files', {})
        unknown = set(raw) - {f.name for f in fields(TrainState)}
        if unknown:
            raise ValueError(f'unknown keys {sorted(unknown)}')
        state = TrainState(**raw)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f'{path} is not a valid trainer state: {err}') from None
    if state.train_loss_sum is None:  # written as null (`to_json`): the sum was not finite
        state.train_loss_sum = math.nan
    return state, files


def read_train_state(checkpoint_dir: Path, accelerator: Optional[Any] = None) -> TrainState:
    """The TrainState stored in a checkpoint folder.

    The stored counters are the sum over all processes: given `accelerator`, only its main process keeps them, so
    that the next `consolidate_counters` counts them once.
    """
    state, _ = _read_state_file(checkpoint_dir)
    if accelerator is not None and not accelerator.is_main_process:
        state.reset_counters()
    return state


def _digest(path: Path) -> Dict[str, Any]:
    with open(path, 'rb') as f:
        return {'size': path.stat().st_size, 'sha256': sha_fileobj(f).hex()}


def _check_file(path: Path) -> None:
    """Parse `path` with a loader that cannot run code; raise what it raises."""
    if path.suffix == '.safetensors':
        load_file(path)
    elif path.suffix == '.json':
        json.loads(path.read_text())
    elif path.suffix in ('.bin', '.pt', '.pkl'):
        from accelerate.utils import load as weights_only_load  # imported when resuming, not for `--help`
        loaded = weights_only_load(path, map_location='cpu')  # torch.load(weights_only=True), numpy RNG allowed
        if path.name.startswith('random_states_') and not (isinstance(loaded, dict) and set(_RNG_KEYS) <= set(loaded)):
            raise ValueError(f'expected a mapping with {", ".join(_RNG_KEYS)}')


def validate_checkpoint(checkpoint_dir: Path) -> TrainState:
    """Check every file of a checkpoint (sizes and hashes it recorded, safetensors headers, JSON, tensor pickles
    read with `weights_only=True`) before anything is restored; raise CheckpointError naming the first bad file."""
    checkpoint_dir = Path(checkpoint_dir)
    state, files = _read_state_file(checkpoint_dir)
    required = ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', *files]
    for name in dict.fromkeys(required):
        if not (checkpoint_dir / name).is_file():
            raise CheckpointError(f'{checkpoint_dir / name} is missing')
    for path in sorted(p for p in checkpoint_dir.iterdir() if p.is_file() and p.name != STATE_FILE):
        if path.name in files and _digest(path) != files[path.name]:
            raise CheckpointError(f'{path} is corrupt: its size or SHA-256 differs from the one recorded in '
                                  f'{STATE_FILE}')
        try:
            _check_file(path)
        except Exception as err:  # any parse failure of untrusted bytes means: not a usable checkpoint file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f'{path} cannot be read safely: {reason}') from None
    return state


def _user_file_mode() -> int:
    """The mode the user's umask gives a new file (safetensors writes 0600 files whatever the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _sort_key(path: Path):
    match = _NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _checkpoints(folder: Path) -> List[Path]:
    found = [p for p in folder.glob('checkpoint-*') if _sort_key(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_sort_key)


def find_checkpoint(path: str) -> Path:
    """The latest checkpoint: `path` itself, or the latest one under a run folder `path` (not validated)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    candidates = _checkpoints(path / 'checkpoints') if path.is_dir() else []
    if not candidates:
        raise CheckpointError(f'--resume {path}: no checkpoint found (expected {path}/checkpoints/checkpoint-*/'
                              f'{STATE_FILE} or a checkpoint folder)')
    return candidates[-1]


def select_checkpoint(path: str) -> Tuple[Path, TrainState, List[str]]:
    """The newest intact checkpoint of `path` (a checkpoint folder, or a run folder), its state, and a note for each
    newer checkpoint that was skipped as corrupt."""
    latest = find_checkpoint(path)
    candidates = [latest] if latest == Path(path) else _checkpoints(latest.parent)[::-1]
    problems = []
    for candidate in candidates:
        try:
            return candidate, validate_checkpoint(candidate), problems
        except CheckpointError as err:
            problems.append(f'skipping checkpoint {candidate}: {err}')
    raise CheckpointError(f'--resume {path}: no intact checkpoint; ' + '; '.join(problems))


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    """Raise CheckpointError naming every setting the checkpoint recorded in which this run differs."""
    diffs = [f'{key}: checkpoint {saved[key]!r}, this run {value!r}'
             for key, value in current.items() if key in saved and saved[key] != value]
    if diffs:
        raise CheckpointError(f'checkpoint {where} is incompatible with this run (' + '; '.join(diffs) + ')')


def load_ema(ema: Any, checkpoint_dir: Path) -> None:
    """Restore the EMA weights of a checkpoint (validated before)."""
    path = Path(checkpoint_dir) / EMA_FILE
    if not path.is_file():
        raise CheckpointError(f'{checkpoint_dir} holds no {EMA_FILE}: it was written without --model-ema (or by '
                              f'an older train.py); resume without --model-ema or start a new run')
    load_model(ema.module, path)


class Checkpointer:
    """Writes checkpoints of a run under `run_dir/checkpoints`, keeping the latest `keep`; `last` is the newest
    checkpoint this run has written or resumed from."""

    def __init__(self, accelerator: Any, run_dir: Path, keep: int = 2, ema: Optional[Any] = None,
                 last: Optional[Path] = None):
        self.accelerator = accelerator
        self.folder = Path(run_dir) / 'checkpoints'
        self.keep = max(1, keep)
        self.ema = ema
        self.last = last

    def save(self, state: TrainState) -> Path:
        acc = self.accelerator
        consolidate_counters(acc, state)
        final = self.folder / f'checkpoint-u{state.updates:09d}-e{state.epoch:04d}'
        tmp = self.folder / f'.tmp-{final.name}'
        if acc.is_main_process:
            for stale in self.folder.glob('.tmp-*'):  # left by a run killed while saving (the run lock is ours)
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.ema is not None:
                save_model(self.ema.module, str(tmp / EMA_FILE))
            mode = _user_file_mode()
            for path in tmp.iterdir():
                path.chmod(mode)
            files = {p.name: _digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / STATE_FILE).write_text(state.to_json(files))
            if final.exists():  # resumed from an earlier checkpoint: this name belongs to a stale future
                final.rename(self.folder / f'.tmp-replaced-{final.name}')
            tmp.rename(final)
            # only now that a new checkpoint is in place: drop a stale future and what is beyond `keep`
            checkpoints = _checkpoints(self.folder)
            stale = [p for p in checkpoints if _sort_key(p) > _sort_key(final)]
            beyond_keep = [p for p in checkpoints if p not in stale][:-self.keep]
            for old in [*self.folder.glob('.tmp-*'), *stale, *beyond_keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        self.last = final
        return final


class StopSignal:
    """Records SIGINT/SIGTERM instead of dying, so the loop can checkpoint and exit; restores handlers on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[int] = None
        self._anywhere = False
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> 'StopSignal':
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def received_anywhere(self, accelerator: Any) -> bool:
        """Whether any process got a signal (a collective through accelerate's trigger: every process calls it)."""
        if self.received is not None:
            accelerator.set_trigger()
        self._anywhere = accelerator.check_trigger() or self._anywhere
        return self._anywhere
