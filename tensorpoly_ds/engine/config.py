"""Run configuration: YAML files validated into dataclasses.

    cfg = load_run_config(["configs/base.yaml", "configs/lora.yaml"], ["train.steps=200", "optim.name=adamw"])

Files are merged in order (later wins, dicts merged key by key, anything else replaced; a file's `include:`
list is merged under it), then the dotted `key=value` overrides are applied (values parsed as YAML: `3` is an
int, `1e-3` a float, `true` a bool, `null` None). Unknown keys are rejected naming the key and the file that
set it; wrong types likewise, in tpds_common.config's one message format. Everything is checked here, before
any process group, model or data is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tensorpoly_ds.adapters import AdapterConfig
from tensorpoly_ds.adapters import ConfigError as AdapterConfigError
from tpds_common.config import apply_overrides, build, check_value, load_files, unknown_keys_message
from tpds_common.errors import ConfigError
from tpds_common.files import atomic_write_text

from .data import BATCHINGS


class RunConfigError(ConfigError):
    """A run configuration is invalid; the message names the key and where it came from."""


@dataclass
class ModelSection:
    # A tensorpoly_ds.models architecture name ("tiny", "t0-3b", "t0-11b": built from a config with random
    # weights, vocab from the data manifest) or any Hugging Face seq2seq name or local path (pretrained).
    name_or_path: str = "tiny"
    vocab_size: int | None = None  # default: the manifest's tokenizer.vocab_size (architectures only)
    arch_overrides: dict = field(default_factory=dict)  # extra T5Config fields for architecture names
    dtype: str = "auto"  # weights dtype: auto (= deepspeed.precision), fp32, bf16


@dataclass
class DataSection:
    dir: str = ""  # prepared data directory (docs/design.md)
    max_input_len: int | None = None  # further truncation (None: as prepared)
    max_target_len: int | None = None
    eval_micro_batch: int | None = None  # default: train.micro_batch * 2
    val_max_samples: int | None = None  # cap the validation rows (None: all of DIR/val)
    # Which rows share a step (engine/data.py). random: as drawn (the order every published result used).
    # length_grouped: rows of similar length share a step, each row still once per epoch (less padding).
    batching: str = "random"
    group_size: int = 4  # length_grouped: global batches sorted together (docs/pretrain.md)


@dataclass
class OptimSection:
    name: str = "adafactor"  # adafactor | adamw
    lr: float = 3e-4  # base lr: every trainable param of a full fine-tune
    module_lr: float = 1e-3  # adapter modules (LoRA/TLoRA/... parameters)
    routing_lr: float = 0.1  # routing logits
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # linear (warmup then linear decay to 0) | constant (after warmup)
    clip: float = 1.0  # global grad-norm clip; 0 disables
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw


@dataclass
class TrainSection:
    steps: int = 100_000  # optimizer steps
    micro_batch: int = 8  # per rank per forward pass
    grad_accum: int = 2
    eval_every: int = 20_000  # 0: never (except at the end)
    save_every: int = 20_000  # 0: only at the end / on signals
    log_every: int = 10
    seed: int = 42
    max_minutes: float = 0.0  # wall budget; 0: none. On expiry: checkpoint, exit 124 (requeue)
    gradient_checkpointing: bool = False
    # TLoRA / TensorPoly-I/II: rebuild the Kronecker factors in backward instead of keeping their intermediates
    # (saves ~2.2 GB at T0-3B with one task per batch, ~2.2 GB with eight; costs a second factor build)
    recompute_adapter_factors: bool = True
    full_finetune: bool = False  # FullFT baseline: no adapters, every parameter trainable
    keep_checkpoints: int = 2
    save_checkpoints: bool = True  # False: no checkpoints at all (short adaptation jobs)
    export_at_end: bool = True
    eval_at_end: bool = True
    heatmap_max_layers: int = 8  # routing heatmaps per eval (evenly spaced routing tables)
    progress_bar: bool = True
    # Gradient alignment between tasks (MHR paper, Fig. 3 left; docs/pretrain.md): every N steps, the cosine
    # similarity of per-task adapter gradients on fixed probe batches. 0 = off.
    grad_alignment_every: int = 0
    grad_alignment_tasks: list = field(default_factory=list)  # task names; [] = up to 8, evenly spaced
    grad_alignment_rows: int = 8  # rows per task in its probe batch (its first rows in DIR/train)
    # Adapter health every step (docs/adapters.md "Adapter health"): train/delta_ratio/* (|delta W x| / |W0 x|)
    # and train/adapter_grad_norm/{modules,routing}, all-reduced over ranks. Changes no number of the run.
    adapter_health: bool = True


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2  # 0, 1, 2, 3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU (stage >= 1)
    offload_param: bool = False  # parameters to CPU (stage 3 only)
    # bf16: DeepSpeed bf16 (bf16 weights, fp32 master copy; the optimizer sees flattened partitions)
    # bf16_autocast: fp32 weights, forward under torch.autocast(bfloat16) (DeepSpeed "torch_autocast"); with
    #   zero_stage 0 the optimizer sees the real parameter shapes (Adafactor factoring as in the reference)
    # fp32: CPU runs and tests.   fp16 is refused: T5 overflows in fp16.
    precision: str = "bf16"
    template: str | None = None  # a JSON template; default ds_configs/zero<stage>[_offload].json
    overrides: dict = field(default_factory=dict)  # merged into the filled config last


@dataclass
class RunSection:
    dir: str = "runs/default"


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterConfig | None = field(default_factory=AdapterConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                None
                if value is None
                else (value.to_dict() if isinstance(value, AdapterConfig) else dataclasses.asdict(value))
            )
        return out

    def fingerprint(self) -> str:
        """Hash of what must not change across a resume (model section, adapter, training mode, optimizer
        kind). The data directory may move; the data position checks the training split's size."""
        body = {
            "model": dataclasses.asdict(self.model),
            "adapter": self.to_dict()["adapter"],
            "full_finetune": self.train.full_finetune,
            "optim": self.optim.name,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


# ---- building (the machinery is tpds_common.config's) -----------------------------------------------------
def _build_adapter(data: Any, sources: dict) -> AdapterConfig | None:
    if data is None:
        return None
    origin = sources.get("adapter", "defaults")
    if not isinstance(data, dict):
        raise RunConfigError(f"{origin}: section 'adapter' must be a mapping or null, got {type(data).__name__}")
    hints = typing.get_type_hints(AdapterConfig)
    known = {f.name for f in dataclasses.fields(AdapterConfig)}
    for key, value in data.items():
        where = sources.get(f"adapter.{key}", origin)
        if key not in known:
            raise RunConfigError(unknown_keys_message(where, [key], known, "adapter"))
        check_value(value, hints[key], f"adapter.{key}", where, RunConfigError)
    try:
        return AdapterConfig(
            **{k: (float(v) if hints[k] is float and isinstance(v, int) else v) for k, v in data.items()}
        )
    except AdapterConfigError as err:
        raise RunConfigError(f"{origin}: {err}") from None


def build_run_config(data: dict, sources: dict | None = None) -> RunConfig:
    sources = sources or {}
    for key in data:
        if key not in SECTIONS:
            raise RunConfigError(
                f"{sources.get(key, 'defaults')}: unknown section '{key}'; valid sections: {', '.join(SECTIONS)}"
            )
    kwargs = {}
    for name, f in SECTIONS.items():
        if name not in data:
            continue
        if name == "adapter":
            kwargs[name] = _build_adapter(data[name], sources)
        else:
            cls = typing.get_type_hints(RunConfig)[name]
            kwargs[name] = build(cls, data[name], name, sources, RunConfigError)
    cfg = RunConfig(**kwargs)
    validate(cfg, sources)
    return cfg


def validate(cfg: RunConfig, sources: dict) -> None:
    def bad(key: str, why: str) -> RunConfigError:
        section, _, name = key.partition(".")
        obj = getattr(cfg, section)
        value = getattr(obj, name) if obj is not None and name else obj
        return RunConfigError(f"{sources.get(key, sources.get(section, 'defaults'))}: key '{key}' = {value!r}: {why}")

    o, t, d, m = cfg.optim, cfg.train, cfg.deepspeed, cfg.model
    if o.name not in ("adafactor", "adamw"):
        raise bad("optim.name", "valid values: adafactor, adamw")
    if o.schedule not in ("linear", "constant"):
        raise bad("optim.schedule", "valid values: linear, constant")
    for k in ("lr", "module_lr", "routing_lr"):
        if getattr(o, k) <= 0:
            raise bad(f"optim.{k}", "must be > 0")
    if not 0 <= o.warmup_ratio < 1:
        raise bad("optim.warmup_ratio", "must be in [0, 1)")
    if o.clip < 0 or o.weight_decay < 0:
        raise bad("optim.clip" if o.clip < 0 else "optim.weight_decay", "must be >= 0")
    if len(o.betas) != 2:
        raise bad("optim.betas", "needs two numbers")
    for k in ("steps", "micro_batch", "grad_accum", "log_every", "keep_checkpoints"):
        if getattr(t, k) < 1:
            raise bad(f"train.{k}", "must be >= 1")
    for k in ("eval_every", "save_every", "heatmap_max_layers", "grad_alignment_every"):
        if getattr(t, k) < 0:
            raise bad(f"train.{k}", "must be >= 0")
    if t.grad_alignment_rows < 1:
        raise bad("train.grad_alignment_rows", "must be >= 1")
    if not all(isinstance(name, str) for name in t.grad_alignment_tasks):
        raise bad("train.grad_alignment_tasks", "must be a list of task names")
    if t.grad_alignment_every:
        from .grad_alignment import unsupported

        why = unsupported(d.zero_stage, has_adapter=cfg.adapter is not None)
        if why:
            raise bad("train.grad_alignment_every", why)
    if t.max_minutes < 0:
        raise bad("train.max_minutes", "must be >= 0")
    if d.zero_stage not in (0, 1, 2, 3):
        raise bad("deepspeed.zero_stage", "valid values: 0, 1, 2, 3")
    if d.precision == "fp16":
        raise bad(
            "deepspeed.precision",
            "fp16 is refused: T5/T0 activations overflow in fp16 (NaN losses); "
            "use bf16 on GPUs that support it, fp32 otherwise",
        )
    if d.precision not in ("bf16", "fp32", "bf16_autocast"):
        raise bad("deepspeed.precision", "valid values: bf16, bf16_autocast, fp32")
    if d.offload_param and d.zero_stage != 3:
        raise bad("deepspeed.offload_param", "parameter offload needs zero_stage 3")
    if d.offload_optimizer and d.zero_stage == 0:
        raise bad("deepspeed.offload_optimizer", "optimizer offload needs zero_stage >= 1")
    if m.dtype not in ("auto", "fp32", "bf16"):
        raise bad("model.dtype", "valid values: auto, fp32, bf16 (fp16 is refused for T5)")
    if t.full_finetune and cfg.adapter is not None:
        raise bad("train.full_finetune", "a full fine-tune trains no adapters: set `adapter: null`")
    if not t.full_finetune and cfg.adapter is None:
        raise bad("adapter", "no adapter configured: set an adapter section or train.full_finetune: true")
    for k in ("max_input_len", "max_target_len", "eval_micro_batch", "val_max_samples"):
        v = getattr(cfg.data, k)
        if v is not None and v < 1:
            raise bad(f"data.{k}", "must be >= 1 or null")
    if cfg.data.batching not in BATCHINGS:
        raise bad("data.batching", f"valid values: {', '.join(BATCHINGS)}")
    if cfg.data.group_size < 1:
        raise bad("data.group_size", "must be >= 1 (global batches sorted together)")


def load_run_config(paths: list[str | os.PathLike], overrides: list[str] = ()) -> RunConfig:
    """Compose YAML files (later wins, nested merge, each with its `include:` files) and dotted overrides into
    a validated RunConfig."""
    sources: dict = {}
    data = load_files(paths, sources, RunConfigError)
    apply_overrides(data, overrides, sources, RunConfigError)
    return build_run_config(data, sources)


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
