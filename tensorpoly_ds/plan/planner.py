"""Memory plan of a pretraining run: per-GPU memory by component, over 1..N GPUs, and the cheapest setting that
fits a GPU size (`tensorpoly-ds plan`, launch/plan.py)."""

from __future__ import annotations

import re
from dataclasses import asdict

from tpds_common.errors import ConfigError

from .memory import (
    BACKWARD_WORKSPACE,
    CANDIDATES,
    GIB,
    Estimate,
    Setting,
    Workload,
    deepspeed_estimate,
    estimate,
    recommend,
)

DEFAULT_LENGTH = 256  # T0's max input/target length, when neither the config nor a flag gives one
T0_TASKS = 313
COLUMNS = (
    "frozen weights",
    "adapter weights",
    "gradients",
    "optimizer states",
    "activations",
    "ZeRO-3 gathered",
    "buffers",
)
SHORT = ("frozen", "adapter", "grads", "optim", "activ", "zero3", "buffers")


class PlanError(ConfigError):
    """A plan's input is invalid (size, GPU count); the message names the flag and the value."""


def parse_size(text: str) -> float:
    """'40GB', '40G', '80GiB', '24576MiB' -> bytes (GB and G are read as GiB, as GPU vendors' sizes are)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise PlanError(f"--gpu-mem {text!r}: expected a size such as 40GB, 80GiB or 24576MiB")
    return float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")


def manifest_tasks(cfg) -> int | None:
    """The number of training tasks of the run's prepared data, when data.dir holds a manifest."""
    if not cfg.data.dir:
        return None
    from tensorpoly_ds.engine.data import DataError, PreparedData

    try:
        return len(PreparedData.open(cfg.data.dir).tasks)
    except (DataError, OSError):  # no prepared data yet: plan for the T0 mixture
        return None


def ds_config_for(cfg, setting: Setting, gpus: int) -> dict:
    """The DeepSpeed config the engine would build for this setting (its template, buckets included)."""
    from dataclasses import replace

    from tensorpoly_ds.engine.ds_config import fill_sections

    ds = replace(
        cfg.deepspeed,
        zero_stage=setting.zero_stage,
        offload_optimizer=setting.offload_optimizer,
        offload_param=setting.offload_param,
    )
    return fill_sections(ds, cfg.train, cfg.optim, gpus)


def plan(cfg, *, num_tasks: int, gpus: int, gpu_bytes: float | None, device: str = "cuda") -> dict:
    from tensorpoly_ds.models import resolve_config

    from .facts import gather_facts
    from .memory import activation_dtype

    m, d = cfg.model, cfg.deepspeed
    config = resolve_config(m.name_or_path, m.vocab_size, m.arch_overrides)
    input_len = cfg.data.max_input_len or DEFAULT_LENGTH
    target_len = cfg.data.max_target_len or DEFAULT_LENGTH
    work = Workload(precision=d.precision, optimizer=cfg.optim.name)
    facts = gather_facts(
        config,
        cfg.adapter,
        num_tasks,
        micro_batch=cfg.train.micro_batch,
        input_len=input_len,
        target_len=target_len,
        activation_dtypes=(activation_dtype(d.precision),),
        attention=device,
    )
    configured = Setting(d.zero_stage, d.offload_optimizer, d.offload_param, cfg.train.gradient_checkpointing)
    settings = list(dict.fromkeys([*CANDIDATES, configured]))

    def at(setting: Setting, n: int) -> Estimate:
        return estimate(facts, work, setting, n, ds_config_for(cfg, setting, n))

    table = [at(s, gpus) for s in settings]
    best = recommend([e for e in table if e.setting in CANDIDATES], gpu_bytes) if gpu_bytes else None
    scaled = best.setting if best else configured
    profile = facts.activations[activation_dtype(d.precision)]
    return {
        "model": m.name_or_path,
        "method": cfg.adapter.method if cfg.adapter else "fullft",
        "adapter": cfg.adapter.to_dict() if cfg.adapter else None,
        "tasks": num_tasks,
        "micro_batch": cfg.train.micro_batch,
        "input_len": input_len,
        "target_len": target_len,
        "precision": d.precision,
        "optimizer": cfg.optim.name,
        "device": device,
        "gpus": gpus,
        "gpu_bytes": gpu_bytes,
        "params": {"frozen": facts.frozen, "trainable": facts.trainable, "largest_module": facts.largest_module},
        "activations": {
            "without_checkpointing": profile.without_checkpointing,
            "with_checkpointing": profile.with_checkpointing,
            "workspace": BACKWARD_WORKSPACE * profile.largest_tensor,
        },
        "configured": asdict(configured),
        "settings": [
            {
                "setting": asdict(e.setting),
                "label": e.setting.label(),
                "gpu": e.gpu,
                "cpu": e.cpu,
                "total": e.total,
                "cpu_total": e.cpu_total,
                "deepspeed_estimate": deepspeed_estimate(facts, e.setting, gpus),
                "fits": None if gpu_bytes is None else e.total <= gpu_bytes,
            }
            for e in table
        ],
        "recommended": asdict(best.setting) if best else None,
        "scaling": {
            "setting": asdict(scaled),
            "label": scaled.label(),
            "total_by_gpus": {n: at(scaled, n).total for n in gpu_counts(gpus)},
        },
        "notes": notes(cfg, best),
    }


def gpu_counts(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k *= 2
    return counts + [n]


def notes(cfg, best: Estimate | None) -> list[str]:
    out = []
    stage = best.setting.zero_stage if best else cfg.deepspeed.zero_stage
    if cfg.optim.name == "adafactor" and (stage >= 1 or cfg.deepspeed.precision == "bf16"):
        out.append(
            "Adafactor under ZeRO >= 1 or DeepSpeed bf16 sees flat partitions: unfactored second moment and "
            "per-partition update clipping, not the reference optimizer (docs/pretrain.md)"
        )
    if best and best.setting.zero_stage in (1, 2) and best.gpu["buffers"] > 4 * best.gpu["gradients"]:
        out.append(
            f"ZeRO-{best.setting.zero_stage} reduce buckets ({best.gpu['buffers'] / GIB:.2f} GiB) are sized for "
            "full fine-tuning; with adapters set deepspeed.overrides={zero_optimization: "
            "{reduce_bucket_size: 5.0e+7}} to save most of it"
        )
    return out


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def format_report(r: dict) -> str:
    p, a = r["params"], r["activations"]
    lines = [
        f"{r['model']} | {r['method']}: {p['frozen'] + p['trainable']:,} parameters, {p['trainable']:,} trainable"
        f" | {r['tasks']} tasks | micro batch {r['micro_batch']}, input {r['input_len']}, target "
        f"{r['target_len']} | {r['precision']} | {r['optimizer']}",
        f"activations per micro-batch (measured on the meta device, {r['device']} attention): "
        f"{gib(a['without_checkpointing'])} GiB, "
        f"{gib(a['with_checkpointing'])} GiB with checkpointing, + {gib(a['workspace'])} GiB backward workspace",
        "",
        f"per-GPU memory (GiB) on {r['gpus']} GPU(s)" + (f", {gib(r['gpu_bytes'])} GiB each" if r["gpu_bytes"] else ""),
    ]
    head = f"{'setting':<46}" + "".join(f"{s:>9}" for s in SHORT) + f"{'total':>9}{'CPU':>8}{'DS est':>9}  fits"
    lines += [head, "-" * len(head)]
    for row in r["settings"]:
        mark = " *" if row["setting"] == r["configured"] else ""
        fits = "" if row["fits"] is None else ("yes" if row["fits"] else "no")
        lines.append(
            f"{row['label'] + mark:<46}"
            + "".join(f"{gib(row['gpu'].get(c, 0.0)):>9}" for c in COLUMNS)
            + f"{gib(row['total']):>9}{gib(row['cpu_total']):>8}{gib(row['deepspeed_estimate']):>9}  {fits}"
        )
    lines.append(
        "* = the configured setting; DS est = DeepSpeed's estimator (frozen weights + model states of the "
        "trainable parameters with 16-bit Adam; ZeRO-2/3 only)"
    )
    if r["gpu_bytes"]:
        rec = next((row for row in r["settings"] if row["setting"] == r["recommended"]), None)
        lines.append("" if rec else "")
        lines.append(
            f"recommended (cheapest that fits {gib(r['gpu_bytes'])} GiB): "
            + (
                f"{rec['label']} ({gib(rec['total'])} GiB per GPU)"
                if rec
                else "nothing fits: lower the micro batch or the lengths, or add GPUs"
            )
        )
    s = r["scaling"]
    lines.append(
        f"{s['label']} per GPU by GPU count: " + ", ".join(f"{n}: {gib(v)} GiB" for n, v in s["total_by_gpus"].items())
    )
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
