"""One run per run folder: a `filelock` (flock) on `<run_dir>/.run.lock`, held for the whole run; the holder's pid,
host and start time are in `.run.holder` beside it (filelock may truncate the lock file)."""
import json
import os
import shlex
import socket
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, List, Optional

from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from .errors import OutputInUse, disk_errors

LOCK_NAME, HOLDER_NAME = '.run.lock', '.run.holder'


def _results(run_dir: Path) -> List[str]:
    """What in `run_dir` a new run would overwrite: an export, metrics of finished epochs (or unreadable ones)."""
    found = ['model/'] if (run_dir / 'model').exists() else []
    try:
        finished = bool(json.loads((run_dir / 'metrics.json').read_text()).get('history'))
    except FileNotFoundError:
        finished = False
    except (OSError, ValueError, AttributeError):  # unreadable: assume it holds results
        finished = True
    return found + (['metrics.json'] if finished else [])


def _refusal(run_dir: Path, resuming: bool) -> Optional[str]:
    """Why a new run may not start in `run_dir` (None: it may)."""
    if resuming:
        return None
    if any((run_dir / 'checkpoints').glob('checkpoint-*')):
        return f'{run_dir} already holds a run: continue it with --resume {shlex.quote(str(run_dir))}, or choose ' \
               f'another --output'
    results = _results(run_dir)
    if results:
        return f'{run_dir} already holds the results of a run ({", ".join(results)}) and no checkpoint to continue ' \
               f'it from: choose another --output, or remove them to start again there'
    return None


@contextmanager
def own_run_dir(accelerator: Any, run_dir: Path, resuming: bool) -> Iterator[None]:
    """Hold the run folder's lock (main process) for the body; fail at once on every process if another run holds it,
    a new run would start in a folder holding a run (checkpoints, an export, metrics of finished epochs) or the
    folder cannot be written; on exit, remove the folders it created if left empty."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    lock = FileLock(run_dir / LOCK_NAME)
    refusal = None
    intact = 'nothing in it was changed' if resuming else 'nothing was written'
    if accelerator.is_main_process:
        try:
            with disk_errors(run_dir, lambda: f'{intact}; choose an --output you can write to'):
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire(timeout=0)
                (run_dir / HOLDER_NAME).write_text(json.dumps({
                    'pid': os.getpid(), 'host': socket.gethostname(),
                    'started': time.strftime('%Y-%m-%dT%H:%M:%S%z')}))
        except Timeout:
            try:
                holder = (run_dir / HOLDER_NAME).read_text()
            except FileNotFoundError:  # not written yet, or just removed
                holder = 'unknown'
            refusal = OutputInUse(f'{run_dir} is in use by another run ({holder}); wait for it to end or choose '
                                  f'another --output')
        except OSError as err:  # OutputUnwritable (or a bug), raised on every process below
            refusal = err
        else:
            reason = _refusal(run_dir, resuming)
            refusal = OutputInUse(reason) if reason else None
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    try:
        if refusal is not None:
            raise refusal
        yield
    finally:
        if lock.is_locked:
            (run_dir / HOLDER_NAME).unlink(missing_ok=True)
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                (run_dir / LOCK_NAME).unlink()  # while locked: filelock 4 retries on an unlinked one
                for folder in created:
                    with suppress(OSError):  # another run's folder appeared beside ours
                        folder.rmdir()
            lock.release()
