"""One error hierarchy: user errors become one line and their documented exit code; bugs keep their traceback.
Mutations tried: report_user_errors catching Exception (test_a_bug_propagates fails); BusyError without its own
exit_code (the busy case returns 2, test_user_errors_map_to_their_exit_codes fails); JobFailed without its
exit_code (the failed-job case returns 2: the same test fails)."""

import pytest

from tpds_common.errors import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    BusyError,
    CheckpointError,
    ConfigError,
    DataError,
    JobFailed,
    UserError,
    report_user_errors,
)
from tpds_common.locking import LockHeld


def _raising(exc):
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, code",
    [
        (ConfigError("run.dir: 'x' is not empty"), EXIT_USAGE),
        (DataError("row 5: bad"), EXIT_USAGE),
        (CheckpointError("step_3: missing"), EXIT_USAGE),
        (BusyError("held by pid 7"), EXIT_BUSY),
        (JobFailed("pretraining failed for ['lr_0.001']"), EXIT_FAILED),
    ],
)
def test_user_errors_map_to_their_exit_codes(exc, code, capsys):
    assert report_user_errors("tool", _raising(exc)) == code
    assert capsys.readouterr().err == f"tool: {exc}\n"


def test_a_bug_propagates_with_its_traceback():
    with pytest.raises(ValueError, match="internal"):
        report_user_errors("tool", _raising(ValueError("internal")))


def test_interrupt_and_success():
    assert report_user_errors("tool", _raising(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert report_user_errors("tool", lambda argv: 0, []) == 0


def test_user_errors_keep_their_builtin_bases():
    # callers (and tests) that catch ValueError / RuntimeError keep working
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(LockHeld, BusyError)
    assert all(issubclass(c, UserError) for c in (ConfigError, DataError, CheckpointError, BusyError))
