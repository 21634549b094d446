"""Atomic, resumable checkpoints of a whole run, and saving on SIGINT/SIGTERM.

A checkpoint is `accelerator.save_state` (model as safetensors, optimizer, scaler, RNG of every process, registered
objects such as the scheduler and EMA) plus `trainer_state.json` (position in the run, meta-layer in use, metrics so far
and what the checkpoint is compatible with). It is written to a hidden temporary folder and renamed into place, so a
folder named `checkpoint-*` is always complete.
"""
import json
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ['TrainState', 'Checkpointer', 'find_checkpoint', 'read_train_state', 'check_compatible', 'StopSignal',
           'consolidate_counters']

STATE_FILE = 'trainer_state.json'
_NAME = re.compile(r'checkpoint-u(\d+)-e(\d+)')


@dataclass
class TrainState:
    """Where a run stands: `epoch` in progress (0-based), its `batches_done`, optimizer `updates` so far."""
    epoch: int = 0
    batches_done: int = 0
    updates: int = 0
    meta_layer: Optional[str] = None
    train_loss_sum: float = 0.
    train_samples: int = 0
    unreadable_train: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    compat: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

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


def read_train_state(checkpoint_dir: Path, accelerator: Optional[Any] = None) -> TrainState:
    """The TrainState stored in a checkpoint folder.

    The stored counters are the sum over all processes: given `accelerator`, only its main process keeps them, so
    that the next `consolidate_counters` counts them once.
    """
    with open(Path(checkpoint_dir) / STATE_FILE) as f:
        state = TrainState(**json.load(f))
    if accelerator is not None and not accelerator.is_main_process:
        state.reset_counters()
    return state


def _sort_key(path: Path):
    match = _NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _checkpoints(folder: Path) -> List[Path]:
    found = [p for p in folder.glob('checkpoint-*') if _sort_key(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_sort_key)


def find_checkpoint(path: str) -> Path:
    """The checkpoint to resume from: `path` itself, or the latest one under a run folder `path`."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    candidates = _checkpoints(path / 'checkpoints') if path.is_dir() else []
    if not candidates:
        raise FileNotFoundError(f'--resume {path}: no checkpoint found (expected {path}/checkpoints/checkpoint-*/'
                                f'{STATE_FILE} or a checkpoint folder)')
    return candidates[-1]


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    """Raise ValueError naming every setting in which the checkpoint and this run differ."""
    diffs = [f'{key}: checkpoint {saved.get(key)!r}, this run {value!r}'
             for key, value in current.items() if saved.get(key) != value]
    if diffs:
        raise ValueError(f'checkpoint {where} is incompatible with this run (' + '; '.join(diffs) + ')')


class Checkpointer:
    """Writes checkpoints of a run under `run_dir/checkpoints`, keeping the latest `keep`."""

    def __init__(self, accelerator: Any, run_dir: Path, keep: int = 2):
        self.accelerator = accelerator
        self.folder = Path(run_dir) / 'checkpoints'
        self.keep = max(1, keep)

    def save(self, state: TrainState) -> Path:
        acc = self.accelerator
        consolidate_counters(acc, state)
        final = self.folder / f'checkpoint-u{state.updates:09d}-e{state.epoch:04d}'
        tmp = self.folder / f'.tmp-{final.name}'
        if acc.is_main_process:
            for stale in self.folder.glob('.tmp-*'):  # left by a run killed while saving
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(state.to_json())
            for later in _checkpoints(self.folder):  # resumed from an earlier checkpoint: that old future is stale
                if _sort_key(later) >= _sort_key(final):
                    shutil.rmtree(later)
            tmp.rename(final)
            for old in _checkpoints(self.folder)[:-self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final


class StopSignal:
    """Records SIGINT/SIGTERM instead of dying, so the loop can checkpoint and exit; restores handlers on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[int] = None
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
        """Whether any process got a signal (a collective: every process must call it)."""
        flag = self.received is not None
        if accelerator.num_processes == 1:
            return flag
        return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), 'sum') > 0)
