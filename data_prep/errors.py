"""Exceptions raised by data preparation.

Two kinds, because callers treat them differently: a DataError points at bad data (file,
config, row, field); a ConfigError (tpds_common's) points at a bad command line (unknown names,
conflicting options, an existing output directory, a missing config). Both are tpds_common user errors:
the CLI reports them in one line with exit 2 (OutputBusy: 75). Both survive pickling, so a worker
process can raise them and the parent reports them intact.
"""

from tpds_common.errors import BusyError, ConfigError
from tpds_common.errors import DataError as UserDataError


class DataError(UserDataError):
    """A source record is malformed. The message names file, config, row and field."""

    def __init__(self, reason: str, origin: str, config: str, row: int, field: str, detail: str):
        self.reason = reason
        self.origin = origin
        self.config = config
        self.row = row
        self.field = field
        self.detail = detail
        super().__init__(
            f"{detail} [reason={reason}] in file {origin}, config {config!r}, row {row}, field {field!r}"
            " (pass --skip-invalid to drop such rows and count them in the manifest)"
        )

    def __reduce__(self):
        return (self.__class__, (self.reason, self.origin, self.config, self.row, self.field, self.detail))


class ReadError(DataError):
    """A source file cannot be read at all or past some point: not UTF-8, not Parquet/Arrow/TFRecord,
    truncated, a checksum mismatch, an empty split. `where` says which row/line/record, or "file"."""

    def __init__(self, origin: str, config: str, where: str, detail: str, reason: str = "unreadable"):
        self.where = where
        ValueError.__init__(self, f"cannot read {origin} (config {config!r}, {where}): {detail}")
        self.reason, self.origin, self.config, self.detail = reason, origin, config, detail
        self.row, self.field = None, "<file>"

    def __reduce__(self):
        return (self.__class__, (self.origin, self.config, self.where, self.detail, self.reason))


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    valid = sorted(valid)
    shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in total)" if len(valid) > 40 else "")
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {shown}")


class OutputBusy(BusyError):
    """Another live prep holds the output folder and --no-wait was given (CLI exit 75, like every stage)."""
