"""Atomic, validated, resumable checkpoints of a whole run, and stopping on SIGINT/SIGTERM to save one.
What a checkpoint holds and what is checked before resuming: docs/training.md#fault-tolerance."""
import hashlib
import json
import math
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate.utils import load  # torch.load(weights_only=True), numpy RNG states allowed
from huggingface_hub.utils.sha import sha_fileobj
from safetensors.torch import load_file, load_model, save_model

from .._text import preview
from .errors import CheckpointError, disk_errors
from .metrics import finite_or_none

STATE_FILE = 'trainer_state.json'
EMA_FILE = 'ema.safetensors'
_PATTERN = 'checkpoint-u*-e*'  # updates and epoch with fixed widths: names sort as (updates, epoch)
_NAME = re.compile(r'checkpoint-u(\d+)-e(\d+)')
_HISTORY_METRICS = ('top1', 'top5', 'val_loss')  # what the run's metrics and model card read from each row
_RNG_KEYS = {'random_state', 'numpy_random_seed', 'torch_manual_seed'}


@dataclass
class TrainState:
    """Where a run stands: `epoch` in progress (0-based), its `batches_done`, optimizer `updates` so far; `command`
    started the run; `files` are the size and SHA-256 of every other file of the checkpoint it was saved in (its
    trainer_state.json records the SHA-256 of its own content beside them, under `sha256`)."""
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
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def reset_counters(self) -> None:
        """Zero the running training counters (at an epoch's end, and on every process but the main one)."""
        self.train_loss_sum, self.train_samples, self.unreadable_train = 0., 0, 0


def consolidate_counters(accelerator: Any, state: TrainState) -> None:
    """Sum the per-process running counters of `state` into the main process (zero elsewhere)."""
    local = torch.tensor([state.train_loss_sum, state.train_samples, state.unreadable_train],
                         dtype=torch.float64, device=accelerator.device)
    loss_sum, samples, unreadable = accelerator.reduce(local, 'sum').tolist()  # one process: `local` as it is
    state.reset_counters()
    if accelerator.is_main_process:
        state.train_loss_sum, state.train_samples, state.unreadable_train = loss_sum, int(samples), int(unreadable)


def _digest(path: Path) -> Dict[str, Any]:
    with open(path, 'rb') as f:
        return {'size': path.stat().st_size, 'sha256': sha_fileobj(f).hex()}


def _content_sha256(content: Dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a trainer state's fields (all but its own `sha256`)."""
    text = json.dumps(content, sort_keys=True, separators=(',', ':'), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def _check_fields(state: TrainState, checkpoint: Path) -> None:
    """ValueError naming the first field of `state` of the wrong type or range, or that disagrees with the folder's
    name (`checkpoint-u<updates>-e<epoch>`) or with the history (one row per finished epoch)."""
    for name in ('epoch', 'batches_done', 'updates', 'train_samples', 'unreadable_train'):
        if not _count(getattr(state, name)):
            raise ValueError(f'"{name}" must be a whole number >= 0, got {getattr(state, name)!r}')
    if not _number_or_null(state.train_loss_sum):
        raise ValueError(f'"train_loss_sum" must be a finite number or null, got {state.train_loss_sum!r}')
    for name, kinds, expected in (('meta_layer', (str, type(None)), 'a string or null'),
                                  ('command', (str, type(None)), 'a string or null'), ('history', list, 'a list'),
                                  ('compat', dict, 'an object'), ('files', dict, 'an object')):
        if not isinstance(getattr(state, name), kinds):
            raise ValueError(f'"{name}" must be {expected}, got {type(getattr(state, name)).__name__}')
    named = _NAME.fullmatch(checkpoint.name)
    if named and (int(named[1]), int(named[2])) != (state.updates, state.epoch):
        raise ValueError(f'"updates" {state.updates} and "epoch" {state.epoch} disagree with the folder name '
                         f'{checkpoint.name}')
    epochs = [row.get('epoch') if isinstance(row, dict) else None for row in state.history]
    if epochs != list(range(state.epoch)):
        raise ValueError(f'"history" must hold one row per finished epoch, 0 to {state.epoch - 1}, for "epoch" '
                         f'{state.epoch}; it holds epochs {preview(epochs)}')
    for row in state.history:
        bad = {key: row.get(key) for key in _HISTORY_METRICS if not _number_or_null(row.get(key))}
        if bad:
            raise ValueError(f'"history" row of epoch {row["epoch"]} holds {bad}: expected finite numbers or null')
    for name, digest in state.files.items():
        if Path(name).name != name or not isinstance(digest, dict) or not _count(digest.get('size')) \
                or not re.fullmatch(r'[0-9a-f]{64}', str(digest.get('sha256'))):
            raise ValueError(f'"files" entry {name!r} must be a file name with its size and SHA-256, got {digest!r}')


def read_train_state(checkpoint_dir: Path) -> TrainState:
    """The TrainState of a checkpoint folder once every file in it is checked: trainer_state.json against the
    SHA-256 of its content it records and field by field (`_check_fields`), every other file against the size and
    SHA-256 recorded for it, then parsed by a loader that cannot run code; a CheckpointError names the first bad file.
    """
    checkpoint = Path(checkpoint_dir)
    try:
        content = json.loads((checkpoint / STATE_FILE).read_text())
        if not isinstance(content, dict):
            raise ValueError(f'expected a JSON object, got {type(content).__name__}')
        recorded = content.pop('sha256', None)  # absent in checkpoints of train.py before it recorded it
        if recorded is not None and recorded != _content_sha256(content):
            raise ValueError('its content does not match the SHA-256 it records (edited or damaged)')
        state = TrainState(**content)  # TypeError on an unknown key
        _check_fields(state, checkpoint)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f'{checkpoint / STATE_FILE} is not a valid trainer state: {err}') from None
    if state.train_loss_sum is None:  # strict JSON holds a non-finite sum as null
        state.train_loss_sum = float('nan')
    for name in dict.fromkeys(['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', *state.files]):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f'{checkpoint / name} is missing')
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file() and p.name != STATE_FILE):
        if path.name in state.files and _digest(path) != state.files[path.name]:
            raise CheckpointError(f'{path} is corrupt: its size or SHA-256 differs from the one recorded in '
                                  f'{STATE_FILE}')
        try:
            if path.suffix == '.safetensors':
                load_file(path)
            elif path.suffix in ('.bin', '.pt', '.pkl'):
                loaded = load(path, map_location='cpu')
                keys = loaded.keys() if isinstance(loaded, dict) else ()
                if path.name.startswith('random_states_') and not _RNG_KEYS <= set(keys):
                    raise ValueError(f'expected a mapping with {", ".join(sorted(_RNG_KEYS))}')
        except Exception as err:  # any parse failure of untrusted bytes means: not a usable checkpoint file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f'{path} cannot be read safely: {reason}') from None
    return state


def _checkpoints(folder: Path) -> List[Path]:
    """The checkpoint folders in `folder`, oldest first."""
    return sorted(p for p in folder.glob(_PATTERN) if (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint folder of a run (complete, as every `checkpoint-*` folder is; not validated)."""
    found = _checkpoints(Path(run_dir) / 'checkpoints')
    return found[-1] if found else None


def select_checkpoint(path: str) -> Tuple[Path, TrainState, List[str]]:
    """The newest intact checkpoint of `path` (a checkpoint folder, which must be intact, or a run folder), its
    validated state, and a note for each newer checkpoint skipped as corrupt."""
    path = Path(path)
    named = (path / STATE_FILE).is_file() or path.match(_PATTERN)
    candidates = [path] if named else _checkpoints(path / 'checkpoints')[::-1]
    if not candidates:
        raise CheckpointError(f'--resume {path}: no checkpoint found (expected {path}/checkpoints/checkpoint-*/'
                              f'{STATE_FILE} or a checkpoint folder)')
    skipped = []
    for candidate in candidates:
        try:
            return candidate, read_train_state(candidate), skipped
        except CheckpointError as err:
            skipped.append(f'skipping checkpoint {candidate}: {err}')
    raise CheckpointError(f'--resume {path}: no intact checkpoint; ' + '; '.join(skipped))


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


@dataclass
class Checkpointer:
    """Writes checkpoints of a run under `run_dir/checkpoints`, keeping the latest `keep`; `last` is the newest
    checkpoint this run has written or resumed from."""
    accelerator: Any
    run_dir: Path
    keep: int = 2
    ema: Optional[Any] = None
    last: Optional[Path] = None

    def save(self, state: TrainState) -> Path:
        """Write a checkpoint of the run at `state` (every process calls it) into a hidden folder renamed into place;
        only then drop older checkpoints beyond `keep`, and newer ones left by a run resumed from an earlier one. A
        failed write removes the partial folder at once; a disk error (full, read-only, ...) is OutputUnwritable."""
        acc, folder = self.accelerator, Path(self.run_dir) / 'checkpoints'
        consolidate_counters(acc, state)
        final = folder / f'checkpoint-u{state.updates:09d}-e{state.epoch:04d}'
        tmp = folder / f'.tmp-{final.name}'
        with disk_errors(tmp, lambda: f'the partial checkpoint is removed; last good checkpoint: '
                                      f'{self.last or "none"}'):
            if acc.is_main_process:
                for stale in folder.glob('.tmp-*'):  # left by a run killed while saving (the run lock is ours)
                    shutil.rmtree(stale)
            acc.wait_for_everyone()
            try:
                self._write(state, tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # at once: a partial checkpoint must not hold a full disk
                raise
        acc.wait_for_everyone()
        self.last = final
        return final

    def _write(self, state: TrainState, tmp: Path, final: Path) -> None:
        acc, folder = self.accelerator, final.parent
        acc.save_state(str(tmp))  # makes the folder
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.ema is not None:
                save_model(self.ema.module, str(tmp / EMA_FILE))
            umask = os.umask(0o022)  # safetensors writes 0600 files: give them the mode open() would
            os.umask(umask)
            for path in tmp.iterdir():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
            state.files = {p.name: _digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            content = finite_or_none(asdict(state))
            content['sha256'] = _content_sha256(content)
            (tmp / STATE_FILE).write_text(json.dumps(content, indent=2, allow_nan=False))
            if final.exists():  # this name belongs to a stale future
                final.rename(folder / f'.tmp-replaced-{final.name}')
            tmp.rename(final)
            kept = [p for p in _checkpoints(folder) if p.name <= final.name][-max(1, self.keep):]  # newer: stale
            for old in [*folder.glob('.tmp-replaced-*'), *set(_checkpoints(folder)) - set(kept)]:
                shutil.rmtree(old)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (`signum`) outside the training loop's safe points: the process ends with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignal:
    """SIGINT/SIGTERM while the context is open: `defer` records them (`received`) for the loop to checkpoint and
    exit at its next safe point, and raises `Interrupted` on leaving the context if one was left unhandled; otherwise
    they raise `Interrupted` at once. The previous handlers are back on exit."""
    received: Optional[int] = None  # the signal number

    def __init__(self, defer: bool):
        self.defer = defer

    def __enter__(self) -> 'StopSignal':
        self._previous = {sig: signal.signal(sig, self._record) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc_type is None and self.received is not None:
            raise Interrupted(self.received)

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum
        if not self.defer:
            raise Interrupted(signum)

    def received_anywhere(self, accelerator: Any) -> bool:
        """Whether any process got a signal: a collective (accelerate's trigger), so every process calls it."""
        if self.received is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()
