"""DeepSpeed config templates (ds_configs/) filled from the run config."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from tpds_common.files import atomic_write_text

from .config import RunConfig, RunConfigError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def template_path(deepspeed) -> Path:
    """deepspeed: the DeepSpeedSection (or a RunConfig)."""
    d = getattr(deepspeed, "deepspeed", deepspeed)
    if d.template:
        return Path(d.template)
    stage = d.zero_stage
    if stage == 3 and (d.offload_param or d.offload_optimizer):
        return TEMPLATE_DIR / "zero3_offload.json"
    return TEMPLATE_DIR / f"zero{stage}.json"


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _find_auto(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if d == "auto" else []


def fill_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The effective DeepSpeed config: the template with every "auto" filled; checks fp16 and the stage."""
    return fill_sections(cfg.deepspeed, cfg.train, cfg.optim, world_size)


def fill_sections(deepspeed, train, optim, world_size: int) -> dict:
    """fill_ds_config for the three sections alone (the trainer API takes sections, not a RunConfig)."""
    path = template_path(deepspeed)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunConfigError(f"deepspeed.template: {path} not found") from None
    except json.JSONDecodeError as err:
        raise RunConfigError(f"deepspeed.template: {path} is not valid JSON ({err})") from None
    d, t = deepspeed, train
    ds = _merge(ds, d.overrides)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = d.zero_stage
    if d.zero_stage >= 1 and d.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    else:
        zero.pop("offload_optimizer", None)
    if d.zero_stage == 3 and d.offload_param:
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    else:
        zero.pop("offload_param", None)
    fills = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": optim.clip,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise RunConfigError(
                f"{path}: '{key}' = {ds[key]!r} contradicts the run config ({value!r}); use \"auto\" in the template"
            )
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") not in (False, "auto", None):
        raise RunConfigError(
            f"{path}: fp16.enabled is refused for T5/T0 (activations overflow in fp16, NaN "
            "losses); set deepspeed.precision to bf16 (or fp32)"
        )
    ds["fp16"] = {"enabled": False}
    ds.setdefault("bf16", {})
    ds["bf16"]["enabled"] = d.precision == "bf16"
    if d.precision == "bf16_autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    else:
        ds.pop("torch_autocast", None)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise RunConfigError(
                f"{path}: '{key}' section found; the engine builds the optimizer and scheduler "
                "itself (param groups per learning rate), remove it from the template"
            )
    left = _find_auto(ds)
    if left:
        raise RunConfigError(f'{path}: no run-config value fills {", ".join(left)} ("auto")')
    return ds


def save_json(obj: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))
    return path
