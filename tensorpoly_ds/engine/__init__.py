"""Stage 2: multi-task pretraining on DeepSpeed (config, launcher env, data, checkpoints, training loop).

Attributes load lazily (PEP 562): the launcher-variable mapping (`engine.distributed.distributed_env`) and
the stop flag (`engine.stop`) are usable before torch is imported."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunConfig": "config",
    "RunConfigError": "config",
    "load_run_config": "config",
    "save_run_config": "config",
    "REQUEUE_EXIT_CODE": "stop",
    "TrainHooks": "trainer",
    "TrainResult": "trainer",
    "train": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
