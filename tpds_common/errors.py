"""User-facing errors and the exit codes the entry points map them to, in one place.

A `UserError` is something the user can fix: a bad config or argument, malformed data, a corrupt or missing
checkpoint, a folder held by another live process. Its message names the file, field and value. An entry point
prints it on one line (`prog: message`) and exits with the class's `exit_code`. Any other exception is a bug and
propagates with its traceback (exit 1), so an internal error never looks like bad input.

Exit codes (documented in README, "Exit codes"):
  0   done (or nothing to do)
  1   a job or stage failed (JobFailed: its log names the cause), or a bug (traceback)
  2   bad input: config, arguments, data, checkpoint  (UserError)
  75  the folder is in use by another live process; try again later  (BusyError, EX_TEMPFAIL)
  124 stopped by the time-limit signal after a checkpoint; requeue to continue
  130 interrupted (Ctrl-C / SIGINT)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 75
EXIT_REQUEUE = 124
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Base of every error the user can fix; entry points report it in one line."""

    exit_code = EXIT_USAGE


class ConfigError(UserError, ValueError):
    """A configuration, argument or name is invalid (unknown key, wrong type, inconsistent values)."""


class DataError(UserError, ValueError):
    """Input data is malformed or missing (a record, a manifest, a prepared dataset)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run."""


class LaunchError(UserError, RuntimeError):
    """The launcher's environment is inconsistent (ranks, world size, addresses)."""


class BusyError(UserError, RuntimeError):
    """Another live process holds the folder; nothing was changed."""

    exit_code = EXIT_BUSY


class JobFailed(UserError, RuntimeError):
    """A job or stage this command ran (or needs) failed or has not run; the message says which and where
    its log or result is. Reported in one line like any user error, with the "failed" status: the cause is
    in that log, not in this command's arguments."""

    exit_code = EXIT_FAILED


def report_user_errors(
    prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
) -> int:
    """Runs an entry point's `main(argv)`: a UserError becomes one line on stderr and its exit code, Ctrl-C
    becomes 130; anything else propagates with its traceback."""
    try:
        return main(argv)
    except UserError as err:
        print(f"{prog}: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
