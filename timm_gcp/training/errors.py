"""User errors of train.py: one line on stderr and an exit code per kind (docs/training.md#errors-and-exit-codes).
They keep their built-in types, so callers of `main()` catch them as usual; `user_errors` marks them with a code."""
import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

EXIT_USAGE = 2  # bad flags, recipe, config or model (argparse uses 2 too)
EXIT_DATA = 3   # missing or malformed data set


class CheckpointError(ValueError):
    """Nothing valid to resume from, or a checkpoint that is corrupt, unsafe to load or does not fit the run."""
    train_exit_code = 4


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many updates."""
    train_exit_code = 5


class OutputInUse(FileExistsError):
    """Another run holds the run folder, or a new run would start in a folder that holds a run."""
    train_exit_code = 6


class WeightsUnreachable(RuntimeError):
    """Pretrained weights the run asked for that neither the Hugging Face cache nor the Hub can deliver."""
    train_exit_code = 7


class OutputUnwritable(OSError):
    """The disk refused a write of the run (checkpoint, export, metrics, lock): full, over quota, read-only or not
    permitted."""
    train_exit_code = 8


DISK_ERRNOS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
               errno.EFBIG: 'file too large for the file system', errno.EROFS: 'read-only file system',
               errno.EACCES: 'permission denied', errno.EPERM: 'operation not permitted'}
# Writers that report a failed write without an OSError: safetensors keeps the errno in its message ("... (os error
# 28)"), torch's zip writer loses it ("unexpected pos 576 vs 534", from an iostream error).
_OS_ERROR_TEXT = re.compile(r'\(os error (\d+)\)')
_TORCH_WRITE_FAILED = ('[enforce fail at inline_container.cc', 'iostream error', 'file write failed')


def _disk_failure(err: Optional[BaseException]) -> Optional[Union[int, str]]:
    """The errno of a disk error (DISK_ERRNOS) in `err` or the errors it was raised from, the library's text for a
    failed write that lost its errno, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err.errno
        found = _OS_ERROR_TEXT.search(str(err))
        if found and int(found[1]) in DISK_ERRNOS:
            return int(found[1])
        if isinstance(err, RuntimeError) and any(text in str(err) for text in _TORCH_WRITE_FAILED):
            return str(err).splitlines()[0]
        err = err.__cause__ or err.__context__
    return None


def unwritable(err: BaseException, path: Union[str, os.PathLike], intact: str) -> Optional[OutputUnwritable]:
    """OutputUnwritable naming the path that failed (the error's own, else `path`), the free space where it tells
    something and what is `intact`, if `err` is the disk refusing a write; None otherwise (a bug keeps its traceback).
    """
    failure = _disk_failure(err)
    if failure is None:
        return None
    failed = Path(getattr(err, 'filename', None) or path)
    if isinstance(failure, int):
        reason = f'{DISK_ERRNOS[failure]} ({errno.errorcode[failure]})'
    else:
        reason = f'the write failed ({failure})'
    space = ''
    if failure in (errno.ENOSPC, errno.EDQUOT) or isinstance(failure, str):
        existing = next(p for p in (failed, *failed.parents) if p.exists())
        space = f'; {shutil.disk_usage(existing).free / 2 ** 20:,.1f} MiB free there'
    return OutputUnwritable(f'cannot write {failed}: {reason}{space}; {intact}')


@contextmanager
def disk_errors(path: Union[str, os.PathLike], intact: Callable[[], str]) -> Iterator[None]:
    """Turn a disk error raised in the body, unless already a user error, into one OutputUnwritable line
    (`unwritable`); `intact()` says what is still good."""
    try:
        yield
    except Exception as err:
        converted = None if exit_code_of(err) is not None else unwritable(err, path, intact())
        if converted is None:
            raise
        raise converted from err


def exit_code_of(err: BaseException) -> Optional[int]:
    """The exit code of a user error, None for anything else (a bug: keep its traceback)."""
    return getattr(err, 'train_exit_code', None)


@contextmanager
def user_errors(code: int) -> Iterator[None]:
    """Mark the built-in user errors raised in the body with exit code `code`, unless already marked."""
    try:
        yield
    except (ValueError, OSError, KeyError, TypeError) as err:
        if exit_code_of(err) is None:
            err.train_exit_code = code
        raise
