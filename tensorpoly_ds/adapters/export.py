"""Adapter export: safetensors weights plus a JSON of the adapter config and the task registry.

The export holds full (gathered) tensors, so it does not depend on the world size or ZeRO stage
it was trained with, and reloads into a fresh model of the same backbone. It holds what was trained or
adapted, not what the config determines: frozen Kronecker LayerNorm affines are no tensors (see
tlora.KronLayerNorm); exports written when they were still load, their constants checked and dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tpds_common.errors import DataError
from tpds_common.files import atomic_output, atomic_write_text

from .config import AdapterConfig
from .inject import CONFIG_ATTR, ROUTING_ATTR, adapter_config, adapter_layers, inject_adapters
from .tlora import frozen_norm_constant

WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "adapter_config.json"
EXPORT_FORMAT = 1


class ExportError(DataError):
    """An adapter export is missing, unreadable or does not match the model; the message names the file."""


def adapter_state_names(model: nn.Module) -> list[str]:
    """state_dict keys owned by adapters (not the wrapped base linears) and by the routing bank."""
    layers = adapter_layers(model)
    names = []
    for key in model.state_dict().keys():
        if key.startswith(ROUTING_ATTR + "."):
            names.append(key)
            continue
        for lname in layers:
            if key.startswith(lname + ".") and not key.startswith(lname + ".base."):
                names.append(key)
                break
    return names


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter an export holds, trainable or not (routing fixed by mode mu, modules frozen by mode
    z): what a ZeRO-3 gather must cover before export."""
    names = set(adapter_state_names(model))
    return [p for n, p in model.named_parameters() if n in names]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    full = model.state_dict()
    return {k: full[k].detach().to("cpu").contiguous() for k in adapter_state_names(model)}


def export_adapters(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tasks: list[str],
    extra: dict[str, Any] | None = None,
    gather: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Path:
    """Write WEIGHTS_FILE and META_FILE into out_dir. `gather` (e.g. a ZeRO-3 GatheredParameters
    factory) makes the full tensors visible while the state is read."""
    cfg = adapter_config(model)
    with gather() if gather else contextlib.nullcontext():
        state = adapter_state_dict(model)
    num_tasks = (
        next((t.num_tasks for t in getattr(model, ROUTING_ATTR).values()), len(tasks)) if cfg.routed else len(tasks)
    )
    return write_export(out_dir, state, cfg, tasks, num_tasks, extra)


def write_export(
    out_dir: str | os.PathLike,
    state: dict[str, torch.Tensor],
    cfg: AdapterConfig,
    tasks: list[str],
    num_tasks: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter state (the keys of adapter_state_names) as an export; each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": EXPORT_FORMAT,
        "adapter": cfg.to_dict(),
        "tasks": list(tasks),
        "num_tasks": num_tasks,
        "tensors": {k: list(v.shape) for k, v in state.items()},
        **(extra or {}),
    }
    with atomic_output(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": str(EXPORT_FORMAT)})
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return out


def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{meta_path}: no adapter export here (missing {META_FILE})") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{meta_path}: not valid JSON ({err})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{meta_path}: field 'format' = {meta.get('format')!r}, expected {EXPORT_FORMAT}")
    return meta


def drop_frozen_norm_constants(
    state: dict[str, torch.Tensor], cfg: AdapterConfig, source: str
) -> dict[str, torch.Tensor]:
    """`state` without the frozen LayerNorm constants that exports and checkpoints written before they
    stopped being tensors hold; such a tensor that does not hold its constant is refused."""
    out = {}
    for key, value in state.items():
        constant = frozen_norm_constant(key, cfg)
        if constant is None:
            out[key] = value
        elif not bool(torch.all(value == constant)):
            raise ExportError(
                f"{source}: tensor {key!r} is a LayerNorm affine of a config with frozen affines "
                f"(layernorm_affine: frozen) but does not hold the constant {constant:g}"
            )
    return out


def config_differences(a: AdapterConfig, b: AdapterConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)  # every field, also those to_dict omits at defaults
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in sorted(da) if da[k] != db[k]]


def load_adapters(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Inject (if needed) and load an export into `model`; returns the export's metadata."""
    meta = read_export_meta(path)
    cfg = AdapterConfig.from_dict(meta["adapter"], source=str(Path(path) / META_FILE))
    if getattr(model, CONFIG_ATTR, None) is None:
        inject_adapters(model, cfg, meta["num_tasks"])
    else:
        diff = config_differences(adapter_config(model), cfg)
        if diff:
            raise ExportError(f"{path}: adapter config differs from the model's: {'; '.join(diff)}")
    weights_path = Path(path) / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise ExportError(f"{weights_path}: cannot read adapter weights ({err})") from None
    expected = set(adapter_state_names(model))
    state = drop_frozen_norm_constants(state, cfg, str(weights_path))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(
            f"{weights_path}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    current = model.state_dict()
    for k, v in state.items():
        if tuple(current[k].shape) != tuple(v.shape):
            raise ExportError(
                f"{weights_path}: tensor {k!r} has shape {tuple(v.shape)}, model expects {tuple(current[k].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return meta
