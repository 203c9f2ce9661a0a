"""One error hierarchy: every exception class defined in the library (tpds_common, data_prep, tensorpoly_ds,
launch; found by walking and importing every module, so a new class is checked without being listed) is a
tpds_common.errors.UserError, reported in one line with its exit code, or listed in INTERNAL as a bug class
that keeps its traceback. The former duplicates are one class.

Mutations tried: tensorpoly_ds/adapt/table.py's TableError back to `class TableError(ValueError)` (the walk
names tensorpoly_ds.adapt.table.TableError); a new `class Oops(Exception)` in tensorpoly_ds/engine/monitor.py
(named too); tensorpoly_ds/adapters/config.py defining its own ConfigError(ValueError) again
(test_the_former_duplicates_are_one_class fails); JobBusy without BusyError (its exit code is 2, not 75:
test_busy_errors_exit_75 fails); ProtocolMismatch(UserError) without RuntimeError
(test_user_errors_keep_a_builtin_base fails)."""

import importlib
import inspect
import pkgutil

import pytest

from tpds_common import errors
from tpds_common.errors import EXIT_BUSY, UserError

PACKAGES = ("tpds_common", "data_prep", "tensorpoly_ds", "launch")
# Raised when code calls the library wrongly (a routed adapter outside task_routing, a batch whose task ids
# do not match it), never by a config, a file or data: a bug, so its traceback is what helps.
INTERNAL = {"tensorpoly_ds.adapters.routing.RoutingError"}


def library_modules():
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if not info.name.endswith(".__main__"):  # running it would start the CLI
                yield importlib.import_module(info.name)


@pytest.fixture(scope="module")
def exception_classes() -> dict[str, type]:
    found = {}
    for module in library_modules():
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_class_is_a_user_error_or_listed_internal(exception_classes):
    assert len(exception_classes) >= 25  # the walk found the library's classes, not an empty set
    unclassified = sorted(
        name for name, cls in exception_classes.items() if not issubclass(cls, UserError) and name not in INTERNAL
    )
    assert not unclassified, (
        f"exception classes without a tpds_common.errors base: {unclassified}; derive "
        "them from ConfigError/DataError/CheckpointError/LaunchError/BusyError/JobFailed, "
        "or list a bug class in INTERNAL"
    )
    stale = sorted(
        name for name in INTERNAL if name not in exception_classes or issubclass(exception_classes[name], UserError)
    )
    assert not stale, f"INTERNAL lists classes that are gone or are user errors: {stale}"


def test_user_errors_keep_a_builtin_base(exception_classes):
    """Callers and tests that catch ValueError / RuntimeError keep working."""
    neither = sorted(
        name
        for name, cls in exception_classes.items()
        if issubclass(cls, UserError) and not issubclass(cls, (ValueError, RuntimeError)) and cls is not UserError
    )
    assert not neither, neither


def test_the_former_duplicates_are_one_class():
    import data_prep.errors as prep_errors
    from tensorpoly_ds.adapters import ConfigError as adapter_config_error
    from tensorpoly_ds.engine import checkpoint, data, distributed

    assert adapter_config_error is prep_errors.ConfigError is errors.ConfigError
    assert data.DataError is errors.DataError and issubclass(prep_errors.DataError, errors.DataError)
    assert checkpoint.CheckpointError is errors.CheckpointError
    assert distributed.LaunchError is errors.LaunchError


def test_busy_errors_exit_75():
    from data_prep.errors import OutputBusy
    from tensorpoly_ds.adapt.spec import JobBusy, JobError
    from tpds_common.locking import LockHeld

    for cls in (JobBusy, OutputBusy, LockHeld):
        assert issubclass(cls, errors.BusyError) and cls.exit_code == EXIT_BUSY, cls
    assert issubclass(JobBusy, JobError)  # callers that catch JobError still see it
