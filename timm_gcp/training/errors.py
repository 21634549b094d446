"""What train.py reports as a user error (one line on stderr, an exit code per kind) rather than a bug.

A user error keeps its Python type (ValueError, FileNotFoundError, ...) so that callers of `main()` can catch it as
usual; the stage it came from marks it with an exit code, which the command line turns into a clean exit.
"""
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple, Type

__all__ = ['EXIT_USAGE', 'EXIT_DATA', 'EXIT_CHECKPOINT', 'EXIT_DIVERGED', 'EXIT_OUTPUT_IN_USE', 'CheckpointError',
           'TrainingDiverged', 'OutputInUse', 'user_errors', 'exit_code_of']

EXIT_USAGE = 2           # bad flags, recipe, config or model (argparse uses 2 too)
EXIT_DATA = 3            # missing or malformed data set
EXIT_CHECKPOINT = 4      # nothing valid to resume from, or a checkpoint that does not fit the run
EXIT_DIVERGED = 5        # non-finite loss for several updates in a row
EXIT_OUTPUT_IN_USE = 6   # another run holds --output, or a new run would start in a folder that holds a run
# interrupted by signal N (SIGINT, SIGTERM): checkpoint saved, exit 128 + N

_USER_ERROR_TYPES: Tuple[Type[BaseException], ...] = (ValueError, OSError, KeyError, TypeError)
_ATTR = 'train_exit_code'


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe to load or incompatible with the run."""


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many updates."""


class OutputInUse(RuntimeError):
    """Another run holds the lock of the run folder."""


def exit_code_of(err: BaseException) -> Optional[int]:
    """The exit code of a user error, None for anything else (a bug: keep its traceback)."""
    if isinstance(err, TrainingDiverged):
        return EXIT_DIVERGED
    if isinstance(err, OutputInUse):
        return EXIT_OUTPUT_IN_USE
    if isinstance(err, CheckpointError):
        return EXIT_CHECKPOINT
    return getattr(err, _ATTR, None)


@contextmanager
def user_errors(code: int, types: Tuple[Type[BaseException], ...] = _USER_ERROR_TYPES) -> Iterator[None]:
    """Mark the user errors (`types`) raised in the body with exit code `code`, unless already marked."""
    try:
        yield
    except types as err:
        if exit_code_of(err) is None:
            setattr(err, _ATTR, code)
        raise
