"""One run per run folder: an exclusive `fcntl.flock` on `<run_dir>/.run.lock`, held for the whole run.

The lock file names its holder (pid, host, start time), so a second run on the same folder fails at once with a
message saying which run owns it. The kernel drops the lock when the holder exits, however it exits (even SIGKILL),
so a stale lock file never blocks a later run.
"""
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

from .errors import EXIT_OUTPUT_IN_USE, OutputInUse, user_errors

__all__ = ['RunLock', 'LOCK_NAME', 'own_run_dir']

LOCK_NAME = '.run.lock'


class RunLock:
    """Exclusive ownership of `run_dir`; `release()` (or leaving the `with` block) gives it up and removes the
    folders this lock created if the run left nothing else in them."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None
        self._created: List[Path] = []

    def acquire(self) -> 'RunLock':
        self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]  # deepest first
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'unknown'
                os.close(fd)
                raise OutputInUse(f'{self.run_dir} is in use by another run ({holder}); wait for it to end or '
                                  f'choose another --output') from None
            try:  # the holder may have removed the file between our open and flock: lock the file on disk
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {'pid': os.getpid(), 'host': socket.gethostname(),
                  'started': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:  # another run's folder appeared beside ours
                    break
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> 'RunLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def own_run_dir(accelerator: Any, run_dir: Path, resuming: bool) -> Iterator[None]:
    """Hold the run folder's lock (taken by the main process) for the body; fail at once on every process if another
    run holds it, or if a new run would start in a folder that holds another run's checkpoints."""
    from accelerate.utils import broadcast_object_list
    lock = RunLock(run_dir)
    refusal = None
    if accelerator.is_main_process:
        try:
            with user_errors(EXIT_OUTPUT_IN_USE, (FileExistsError,)):
                lock.acquire()
                if not resuming and any((Path(run_dir) / 'checkpoints').glob('checkpoint-*')):
                    raise FileExistsError(f'{run_dir} already holds a run: continue it with --resume {run_dir}, or '
                                          f'choose another --output')
        except (OutputInUse, FileExistsError) as err:
            lock.release()
            refusal = err
    if accelerator.num_processes > 1:
        message = broadcast_object_list([None if refusal is None else str(refusal)])[0]
        if refusal is None and message is not None:
            refusal = OutputInUse(message)
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        lock.release()
