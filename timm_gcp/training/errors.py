"""User errors of train.py: one line on stderr and an exit code per kind (docs/training.md#errors-and-exit-codes).
They keep their built-in types, so callers of `main()` catch them as usual; `user_errors` marks them with a code."""
from contextlib import contextmanager
from typing import Iterator, Optional

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
