"""Named errors for what a user can fix, and the one place a command line turns them into a message.

Every mistake a user can make (a bad flag or environment variable, a missing or wrong input file, an output that
already exists, inputs that do not belong together) raises a :class:`UserError` subclass whose message names the
flag, variable or file and says what to do. Each command's ``main`` runs its body through :func:`run_cli`, which
prints such an error as ``prog: error: message`` on stderr and returns its exit status, with no traceback; an
``OSError`` on a file (a full disk, a read-only folder, a folder where a file was expected) and Ctrl-C are
reported the same way. Anything else is a bug and keeps its traceback.

The classes also derive from the builtin a caller would have caught before (``ValueError``,
``FileNotFoundError``, ``FileExistsError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable


class UserError(Exception):
    """Something the user can fix; the message says what and how. ``exit_code``: the CLI's exit status."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A setting is invalid: the message names its flag (and environment variable) and the allowed values."""

    exit_code = 2


class InputError(UserError, ValueError):
    """An input file is unreadable or not what it should be: the message names the file."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder does not exist."""


class MismatchError(InputError):
    """Inputs that do not belong together (an artifact and another tokenizer, a summary and another artifact)."""


class OutputExistsError(UserError, FileExistsError):
    """An output already exists and ``--force`` was not given."""


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's ``body``; a user error, an OSError or Ctrl-C becomes ``prog: error: ...`` and a status."""
    try:
        rc = body()
    except UserError as e:
        return _fail(prog, str(e), e.exit_code)
    except OSError as e:
        return _fail(prog, describe_os_error(e), 1)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted (Ctrl-C)", 130)
    return 0 if rc is None else int(rc)


def describe_os_error(e: OSError) -> str:
    """``e`` in words with the file it concerns and, for a full disk or a permission problem, what to do."""
    where = f" ({e.filename})" if e.filename else ""
    text = f"{e.strerror or e}{where}"
    if e.errno == errno.ENOSPC:
        text += "; free some space (or write elsewhere) and run again"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += "; choose a folder you can write to"
    elif e.errno == errno.EISDIR:
        text += "; a file was expected, not a folder"
    return text


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


__all__ = ["UserError", "ConfigError", "InputError", "MissingInputError", "MismatchError", "OutputExistsError",
           "run_cli", "describe_os_error"]
