"""Exceptions raised by data preparation.

Two kinds, because callers treat them differently: a DataError points at a bad
record in the user's data (file, config, row, field); a ConfigError points at a bad
command line (unknown names, conflicting options, an existing output directory).
"""


class DataError(ValueError):
    """A source record is malformed. The message names file, config, row and field."""

    def __init__(self, reason: str, origin: str, config: str, row: int, field: str, detail: str):
        self.reason = reason
        self.origin = origin
        self.config = config
        self.row = row
        self.field = field
        super().__init__(
            f"{detail} [reason={reason}] in file {origin}, config {config!r}, row {row}, field {field!r}"
            " (pass --skip-invalid to drop such rows and count them in the manifest)"
        )


class ConfigError(ValueError):
    """The requested preparation cannot run as specified (unknown names, bad options, existing DIR)."""


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    valid = sorted(valid)
    shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in total)" if len(valid) > 40 else "")
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {shown}")
