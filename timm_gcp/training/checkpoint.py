"""Atomic, validated, resumable checkpoints of a whole run, and stopping on SIGINT/SIGTERM to save one.
What a checkpoint holds and what is checked before resuming: docs/training.md#fault-tolerance."""
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate.utils import load  # torch.load(weights_only=True), numpy RNG states allowed
from huggingface_hub.utils.sha import sha_fileobj
from safetensors.torch import load_file, load_model, save_model

from .errors import CheckpointError
from .metrics import finite_or_none

STATE_FILE = 'trainer_state.json'
EMA_FILE = 'ema.safetensors'
_PATTERN = 'checkpoint-u*-e*'  # updates and epoch with fixed widths: names sort as (updates, epoch)
_RNG_KEYS = {'random_state', 'numpy_random_seed', 'torch_manual_seed'}


@dataclass
class TrainState:
    """Where a run stands: `epoch` in progress (0-based), its `batches_done`, optimizer `updates` so far; `command`
    started the run; `files` are the size and SHA-256 of every other file of the checkpoint it was saved in."""
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


def read_train_state(checkpoint_dir: Path) -> TrainState:
    """The TrainState of a checkpoint folder once every file in it is checked (the size and SHA-256 it recorded, then
    a parse by a loader that cannot run code); a CheckpointError names the first bad file."""
    checkpoint = Path(checkpoint_dir)
    try:
        state = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))  # TypeError on an unknown key
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
        only then drop older checkpoints beyond `keep`, and newer ones left by a run resumed from an earlier one."""
        acc, folder = self.accelerator, Path(self.run_dir) / 'checkpoints'
        consolidate_counters(acc, state)
        final = folder / f'checkpoint-u{state.updates:09d}-e{state.epoch:04d}'
        tmp = folder / f'.tmp-{final.name}'
        if acc.is_main_process:
            for stale in folder.glob('.tmp-*'):  # left by a run killed while saving (the run lock is ours)
                shutil.rmtree(stale)
        acc.wait_for_everyone()
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
            (tmp / STATE_FILE).write_text(json.dumps(finite_or_none(asdict(state)), indent=2, allow_nan=False))
            if final.exists():  # this name belongs to a stale future
                final.rename(folder / f'.tmp-replaced-{final.name}')
            tmp.rename(final)
            kept = [p for p in _checkpoints(folder) if p.name <= final.name][-max(1, self.keep):]  # newer: stale
            for old in [*folder.glob('.tmp-replaced-*'), *set(_checkpoints(folder)) - set(kept)]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        self.last = final
        return final


class StopSignal:
    """Records SIGINT/SIGTERM instead of dying, so the loop can checkpoint and exit; restores the handlers on exit."""
    received: Optional[int] = None  # the signal number

    def __enter__(self) -> 'StopSignal':
        self._previous = {sig: signal.signal(sig, self._record) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum

    def received_anywhere(self, accelerator: Any) -> bool:
        """Whether any process got a signal: a collective (accelerate's trigger), so every process calls it."""
        if self.received is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()
