"""The one check every config loader makes first: keys the loader does not know are refused, by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def reject_unknown(data: Mapping, valid: Iterable[str], where: str, error: type[Exception], what: str = "key") -> None:
    """Raise `error` naming the unknown keys of `data` and the valid ones (a typo must not be silently ignored)."""
    valid = set(valid)
    unknown = sorted(set(data) - valid)
    if unknown:
        raise error(f"{where}: unknown {what}(s) {unknown}; valid {what}s: {', '.join(sorted(valid))}")
