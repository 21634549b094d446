"""One run per run folder: a `filelock` (flock) on `<run_dir>/.run.lock`, held for the whole run; the holder's pid,
host and start time are in `.run.holder` beside it (filelock may truncate the lock file)."""
import json
import os
import socket
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from .errors import OutputInUse

LOCK_NAME, HOLDER_NAME = '.run.lock', '.run.holder'


@contextmanager
def own_run_dir(accelerator: Any, run_dir: Path, resuming: bool) -> Iterator[None]:
    """Hold the run folder's lock (main process) for the body; fail at once on every process if another run holds it
    or a new run would start in a folder holding checkpoints; on exit, remove the folders it created if left empty."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    lock = FileLock(run_dir / LOCK_NAME)
    refusal = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = (run_dir / HOLDER_NAME).read_text()
            except FileNotFoundError:  # not written yet, or just removed
                holder = 'unknown'
            refusal = f'{run_dir} is in use by another run ({holder}); wait for it to end or choose another --output'
        else:
            (run_dir / HOLDER_NAME).write_text(json.dumps({
                'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z')}))
            if not resuming and any((run_dir / 'checkpoints').glob('checkpoint-*')):
                refusal = (f'{run_dir} already holds a run: continue it with --resume {run_dir}, or choose another '
                           f'--output')
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    try:
        if refusal is not None:
            raise OutputInUse(refusal)
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
