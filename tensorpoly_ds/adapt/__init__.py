"""Few-shot adaptation jobs, job tables (sweeps) and result reports.

Attributes load lazily (PEP 562): `tensorpoly_ds.adapt.spec` and `.table` stay importable without torch,
which `tensorpoly-ds adapt` uses to refuse an impossible job before anything heavy is imported."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdaptJob": "spec",
    "FULLFT": "spec",
    "JobError": "spec",
    "MARKER_FILE": "spec",
    "RESULT_FILE": "spec",
    "is_complete": "job",
    "run_job": "job",
    "setup_model": "job",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
