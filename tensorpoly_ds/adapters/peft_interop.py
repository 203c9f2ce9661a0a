"""peft interop: our LoRA, Poly, MHR and (IA)^3 exports as peft adapter folders, and back.

A peft folder holds adapter_config.json (a LoraConfig / PolyConfig / IA3Config) and adapter_model.safetensors
with keys `base_model.model.<module>.<tensor>` (peft 0.21 layouts, read from its source):

| ours (export)                                   | peft                                               |
|-------------------------------------------------|----------------------------------------------------|
| LoRA `<m>.lora_a` [in, r], `<m>.lora_b` [r, out]| `<m>.lora_A.weight` [r, in], `<m>.lora_B.weight` [out, r]; lora_alpha = alpha |
| Poly/MHR `<m>.lora_a` [S, h, in/h, r]            | `<m>.poly_lora_A` [h, S, in/h, r] (n_splits = h)   |
| Poly/MHR `<m>.lora_b` [S, h, r, out/h]           | `<m>.poly_lora_B` [h, S, r, out/h]                 |
| routing `tpds_routing.<m>.logits` [tasks, h, S]  | `<m>.poly_router.module_logits` [tasks, h * S]     |
| (IA)^3 `<m>.ia3_scale` [out] (scales the output) | `<m>.ia3_l` [out, 1], not a feedforward module     |

Both sides compute the same function: x A B / r for Poly (peft divides by r; ours by r / alpha), sigmoid
routing normalised over skills with eps 1e-12 in evaluation. What cannot map is refused, naming the field:
TLoRA / TensorPoly / tensor-train methods, routing tables shared across layers (routing_granularity other
than layer: peft has one router per layer), Poly alpha != 1, routing fixed to uniform (mode mu; collapse it
into a LoRA first), and on import DoRA, rsLoRA, biases, per-layer rank/alpha patterns, modules_to_save and
(IA)^3 on inputs other than a gated FFN's `wo`. Training semantics peft lacks are refused unless the user
says the export is for inference (`inference_only`): peft's Poly router always samples RelaxedBernoulli
noise (temperature 1) in training, so our deterministic routing (`gumbel: false`, the T0 configs), other
temperatures and straight-through do not carry over (evaluation outputs are identical). An import of a
peft Poly adapter gets exactly peft's semantics (gumbel on, temperature 1).

The folder also gets `tensorpoly_ds.json` (our adapter config, task names, backbone), so a round trip
restores the export exactly; peft ignores it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpds_common.files import atomic_folder

from .config import AdapterConfig, ConfigError
from .export import META_FILE, WEIGHTS_FILE, adapter_state_names, read_export_meta, write_export
from .inject import adapter_layers, inject_adapters, routing_key

PEFT_CONFIG_FILE = "adapter_config.json"  # peft's names (the same as ours, in another directory)
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "tensorpoly_ds.json"
PREFIX = "base_model.model."
PEFT_TYPES = {"lora": "LORA", "poly": "POLY", "mhr": "POLY", "ia3": "IA3"}
TASK_TYPE = "SEQ_2_SEQ_LM"
KEY_SEPARATORS = {"lora": ".lora_", "poly": ".poly_", "mhr": ".poly_", "ia3": "."}  # module | tensor in a key


class PeftInteropError(ConfigError):
    """An adapter cannot be expressed on the other side; the message names the field and the value."""


# ---- the model side: which Linear layers exist and which carry adapters -----------------------------------
def backbone_linears(base_model: str, vocab_size: int | None = None, arch_overrides: dict | None = None) -> list[str]:
    """Names of every nn.Linear of the backbone (meta device: nothing is downloaded or allocated)."""
    from tensorpoly_ds.models import build_meta_model, resolve_config

    model = build_meta_model(resolve_config(base_model, vocab_size, arch_overrides))
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def meta_adapted(base_model: str, cfg: AdapterConfig, num_tasks: int, backbone: dict | None = None) -> nn.Module:
    from tensorpoly_ds.models import build_meta_model, resolve_config

    backbone = backbone or {}
    model = build_meta_model(resolve_config(base_model, backbone.get("vocab_size"), backbone.get("arch_overrides")))
    return inject_adapters(model, cfg, num_tasks)


def peft_target_modules(adapted: list[str], linears: list[str]) -> list[str] | str:
    """peft's target_modules for exactly `adapted`: the module names' last parts when they select exactly these
    layers (what peft users write, e.g. ["q", "v"]), else a regex of the full names (peft full-matches it)."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if {n for n in linears if n.rsplit(".", 1)[-1] in suffixes} == set(adapted):
        return suffixes
    return "(?:" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"


def our_targets(adapted: list[str], linears: list[str], method: str) -> str | None:
    """AdapterConfig.targets selecting exactly `adapted` (searched): None when the method's default does,
    else the last two name parts, else the full names."""
    default = AdapterConfig(method=method).target_regex
    if {n for n in linears if re.search(default, n)} == set(adapted):
        return None
    tails = sorted({".".join(n.split(".")[-2:]) for n in adapted})
    regex = r"(?:^|\.)(?:" + "|".join(re.escape(t) for t in tails) + ")$"
    if {n for n in linears if re.search(regex, n)} == set(adapted):
        return regex
    return "^(?:" + "|".join(re.escape(n) for n in sorted(adapted)) + ")$"


# ---- ours -> peft ------------------------------------------------------------------------------------------
def check_exportable(cfg: AdapterConfig, state: dict[str, torch.Tensor], inference_only: bool) -> list[str]:
    """Refuse what peft cannot express; return notes on what differs only in training (inference_only)."""

    def bad(field: str, value: Any, why: str) -> PeftInteropError:
        return PeftInteropError(f"adapter config field '{field}' = {value!r}: {why}")

    if cfg.method not in PEFT_TYPES:
        raise bad(
            "method",
            cfg.method,
            f"peft has no TLoRA, TensorPoly or tensor-train adapter; exportable methods: {', '.join(PEFT_TYPES)}",
        )
    if not cfg.routed:
        return []
    routing = getattr(cfg, "routing", "learned")  # Random-mu (routing: random, on main) has no logits to map
    if routing != "learned":
        raise bad("routing", routing, "peft's Poly routes with learned logits only")
    if cfg.routing_granularity != "layer":
        raise bad(
            "routing_granularity",
            cfg.routing_granularity,
            "peft's Poly has one router per layer; routing tables shared across layers cannot map",
        )
    if cfg.alpha != 1.0:
        raise bad("alpha", cfg.alpha, "peft's Poly scales by 1/r, ours by alpha/r; only alpha = 1 maps")
    uniform = [k for k, v in state.items() if k.endswith(".uniform") and bool(v)]
    if uniform:
        raise PeftInteropError(
            f"{uniform[0]} = True: routing fixed to uniform (adaptation mode mu) has no peft "
            "equivalent; collapse it into one LoRA first (adapt --set collapse=true) and export that"
        )
    training = []
    if not cfg.gumbel:
        training.append(("gumbel", cfg.gumbel, "our router is deterministic in training (sigmoid)"))
    else:
        if cfg.temperature != 1.0:
            training.append(("temperature", cfg.temperature, "peft samples with temperature 1"))
        if cfg.straight_through:
            training.append(("straight_through", cfg.straight_through, "peft has no straight-through routing"))
    notes = []
    for field, value, why in training:
        message = (
            f"adapter config field '{field}' = {value!r}: {why}, while peft's Poly router always samples "
            "RelaxedBernoulli(temperature 1) in training; evaluation outputs are identical"
        )
        if not inference_only:
            raise PeftInteropError(message + "; pass --inference-only to export for evaluation or serving")
        notes.append(message + " (exported for inference)")
    return notes


def to_peft(
    cfg: AdapterConfig,
    state: dict[str, torch.Tensor],
    adapted: list[str],
    linears: list[str],
    num_tasks: int,
    base_model: str | None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(peft adapter_config dict, peft tensors) for an exportable adapter state."""
    tensors: dict[str, torch.Tensor] = {}
    for name in adapted:
        p = PREFIX + name
        if cfg.method == "lora":
            tensors[f"{p}.lora_A.weight"] = state[f"{name}.lora_a"].t().contiguous()
            tensors[f"{p}.lora_B.weight"] = state[f"{name}.lora_b"].t().contiguous()
        elif cfg.method in ("poly", "mhr"):
            tensors[f"{p}.poly_lora_A"] = state[f"{name}.lora_a"].transpose(0, 1).contiguous()
            tensors[f"{p}.poly_lora_B"] = state[f"{name}.lora_b"].transpose(0, 1).contiguous()
            logits = state[f"tpds_routing.{routing_key(name, cfg)}.logits"]
            tensors[f"{p}.poly_router.module_logits"] = logits.reshape(logits.shape[0], -1).contiguous()
        else:
            tensors[f"{p}.ia3_l"] = state[f"{name}.ia3_scale"][:, None].contiguous()
    common = {
        "peft_type": PEFT_TYPES[cfg.method],
        "task_type": TASK_TYPE,
        "base_model_name_or_path": base_model,
        "target_modules": peft_target_modules(adapted, linears),
        "exclude_modules": None,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }
    if cfg.method == "lora":
        specific = {
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
        }
    elif cfg.method in ("poly", "mhr"):
        specific = {
            "r": cfg.rank,
            "n_tasks": num_tasks,
            "n_skills": cfg.skills,
            "n_splits": cfg.heads,
            "poly_type": "poly",
            "init_weights": True,
        }
    else:
        specific = {"feedforward_modules": [], "fan_in_fan_out": False, "init_ia3_weights": True}
    return {**common, **specific}, tensors


def export_to_peft(
    export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    inference_only: bool = False,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Write our export at `export_dir` as a peft adapter folder `out_dir`; returns (out_dir, notes)."""
    from safetensors.torch import save_file

    export_dir, out = Path(export_dir), Path(out_dir)
    meta = read_export_meta(export_dir)
    cfg = AdapterConfig.from_dict(meta["adapter"], source=str(export_dir / META_FILE))
    refuse_existing(out, overwrite)
    state = load_weights(export_dir / WEIGHTS_FILE)
    notes = check_exportable(cfg, state, inference_only)
    backbone = meta.get("backbone") or {}
    base = base_model or backbone.get("name_or_path") or backbone.get("model")
    if not base:
        raise PeftInteropError(
            f"{export_dir / META_FILE}: no backbone recorded; pass --base-model (a Hugging Face "
            "name or path, a config.json, or an architecture name)"
        )
    model = meta_adapted(base, cfg, meta["num_tasks"], backbone if base_model is None else None)
    check_state(model, state, export_dir / WEIGHTS_FILE)
    adapted = list(adapter_layers(model))
    linears = adapted + [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(".base")]
    peft_config, tensors = to_peft(cfg, state, adapted, linears, meta["num_tasks"], base_model or base)
    sidecar = {
        "adapter": cfg.to_dict(),
        "tasks": meta["tasks"],
        "num_tasks": meta["num_tasks"],
        "backbone": backbone,
        "notes": notes,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
        (tmp / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2, sort_keys=True))

    return atomic_folder(out, write), notes


# ---- peft -> ours ------------------------------------------------------------------------------------------
def read_peft_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    config_path = path / PEFT_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise PeftInteropError(f"{config_path}: no peft adapter here (missing {PEFT_CONFIG_FILE})") from None
    except json.JSONDecodeError as err:
        raise PeftInteropError(f"{config_path}: not valid JSON ({err})") from None
    if "format" in config and "adapter" in config:
        raise PeftInteropError(f"{path}: this is a tensorpoly-ds export, not a peft adapter folder")
    weights = path / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        raise PeftInteropError(f"{weights}: missing (only safetensors peft adapters are read: no pickle)")
    sidecar_path = path / SIDECAR_FILE
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else None
    return config, load_weights(weights), sidecar


def check_importable(config: dict, source: Path, inference_only: bool) -> str:
    """The method a peft config maps to; refuses features ours lacks, naming the field."""

    def bad(field: str, why: str) -> PeftInteropError:
        return PeftInteropError(f"{source / PEFT_CONFIG_FILE}: field '{field}' = {config.get(field)!r}: {why}")

    kind = config.get("peft_type")
    if kind not in ("LORA", "POLY", "IA3"):
        raise bad("peft_type", "only LORA, POLY and IA3 adapters map to tensorpoly-ds methods")
    if config.get("modules_to_save"):
        raise bad("modules_to_save", "fully trained extra modules are not adapters")
    if config.get("fan_in_fan_out"):
        raise bad("fan_in_fan_out", "Conv1D-style (transposed) weights are not supported")
    if kind == "LORA":
        refused = {
            "use_dora": "DoRA's magnitude vector has no tensorpoly-ds equivalent",
            "use_rslora": "rsLoRA scales by alpha/sqrt(r), ours by alpha/r",
            "lora_bias": "LoRA biases are not supported",
            "rank_pattern": "per-layer ranks are not supported",
            "alpha_pattern": "per-layer alphas are not supported",
            "layers_to_transform": "give target_modules instead",
            "layer_replication": "layer replication is not supported",
            "target_parameters": "adapters on parameters (not Linear modules) are not supported",
            "trainable_token_indices": "trainable tokens are not supported",
        }
        for field, why in refused.items():
            if config.get(field):
                raise bad(field, why)
        if config.get("bias", "none") != "none":
            raise bad("bias", "trained biases are not supported")
        if config.get("lora_dropout", 0.0) and not inference_only:
            raise bad(
                "lora_dropout",
                "ours has no LoRA dropout (training only; evaluation is identical): pass "
                "--inference-only to import it for evaluation",
            )
        return "lora"
    if kind == "POLY":
        if config.get("poly_type", "poly") != "poly":
            raise bad("poly_type", "only 'poly' routing maps")
        return "mhr" if int(config.get("n_splits", 1)) > 1 else "poly"
    return "ia3"


def from_peft(
    config: dict, tensors: dict[str, torch.Tensor], method: str, linears: list[str], source: Path
) -> tuple[AdapterConfig, int, dict[str, dict[str, torch.Tensor]]]:
    """(AdapterConfig, number of tasks, per adapted module its tensors in our layout, keyed by our names)."""
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise PeftInteropError(f"{source / PEFT_WEIGHTS_FILE}: tensor {key!r} does not start with {PREFIX!r}")
        # <module>.lora_A.weight, <module>.poly_router.module_logits, <module>.ia3_l
        module, _, kind = key[len(PREFIX) :].rpartition(KEY_SEPARATORS[method])
        per_module.setdefault(module, {})[kind] = value
    num_tasks = int(config.get("n_tasks", 1)) if method in ("poly", "mhr") else 1
    ours: dict[str, dict[str, torch.Tensor]] = {}
    for module, parts in per_module.items():
        if method == "lora":
            ours[module] = {"lora_a": parts["A.weight"].t().contiguous(), "lora_b": parts["B.weight"].t().contiguous()}
        elif method in ("poly", "mhr"):
            a, b, logits = parts["lora_A"], parts["lora_B"], parts["router.module_logits"]
            heads, skills = a.shape[0], a.shape[1]
            ours[module] = {
                "lora_a": a.transpose(0, 1).contiguous(),
                "lora_b": b.transpose(0, 1).contiguous(),
                "logits": logits.reshape(logits.shape[0], heads, skills).contiguous(),
            }
        else:
            scale = parts["ia3_l"]
            if scale.shape[0] == 1 and scale.dim() == 2:  # a feedforward module: peft scales its input
                target = re.sub(r"\.wo$", ".wi_1", module)
                if target == module or target not in linears:
                    raise PeftInteropError(
                        f"{source / PEFT_CONFIG_FILE}: field 'feedforward_modules' includes {module!r}: peft scales "
                        "that layer's input; ours scales outputs, which only maps for a gated FFN's wo (as wi_1's "
                        "output)"
                    )
                if target in ours or target in per_module:
                    raise PeftInteropError(
                        f"{source / PEFT_CONFIG_FILE}: both {module!r} (input) and {target!r} "
                        "(output) are scaled; they would map onto the same vector"
                    )
                ours[target] = {"ia3_scale": scale.flatten().contiguous()}
            else:
                ours[module] = {"ia3_scale": scale.flatten().contiguous()}
    adapted = sorted(ours)
    fields: dict[str, Any] = {"method": method, "targets": our_targets(adapted, linears, method)}
    if method == "lora":
        fields.update(rank=int(config["r"]), alpha=float(config.get("lora_alpha", 8)))
    elif method in ("poly", "mhr"):
        fields.update(
            rank=int(config["r"]),
            skills=int(config["n_skills"]),
            heads=int(config.get("n_splits", 1)),
            gumbel=True,
            temperature=1.0,
        )  # peft's router samples in training
    try:
        cfg = AdapterConfig(**fields)
    except ConfigError as err:
        raise PeftInteropError(f"{source / PEFT_CONFIG_FILE}: {err}") from None
    return cfg, num_tasks, ours


def peft_signature(cfg: AdapterConfig) -> tuple:
    """The fields of an AdapterConfig that a peft config records."""
    if cfg.method == "lora":
        return ("LORA", cfg.rank, cfg.alpha)
    if cfg.method in ("poly", "mhr"):
        return ("POLY", cfg.rank, cfg.skills, cfg.heads)
    return (PEFT_TYPES.get(cfg.method, cfg.method),)


def import_from_peft(
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    tasks: list[str] | None = None,
    inference_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the peft adapter folder `peft_dir` as our export `out_dir` (loadable with load_adapters)."""
    source, out = Path(peft_dir), Path(out_dir)
    config, tensors, sidecar = read_peft_folder(source)
    method = check_importable(config, source, inference_only)
    refuse_existing(out, overwrite)
    backbone = (sidecar or {}).get("backbone") or {}
    base = base_model or config.get("base_model_name_or_path") or backbone.get("name_or_path") or backbone.get("model")
    if not base:
        raise PeftInteropError(
            f"{source / PEFT_CONFIG_FILE}: field 'base_model_name_or_path' is empty; pass --base-model"
        )
    linears = backbone_linears(base, backbone.get("vocab_size"), backbone.get("arch_overrides"))
    cfg, num_tasks, ours = from_peft(config, tensors, method, linears, source)
    if sidecar is not None:  # a folder we exported: restore our config (targets, routing semantics) exactly
        saved = AdapterConfig.from_dict(sidecar["adapter"], source=str(source / SIDECAR_FILE))
        if peft_signature(saved) != peft_signature(cfg):
            raise PeftInteropError(
                f"{source / SIDECAR_FILE}: describes {peft_signature(saved)}, the peft config "
                f"{peft_signature(cfg)} (edited by hand?); delete it to import from the peft config"
            )
        cfg = saved
    names = tasks or (sidecar or {}).get("tasks") or [f"task{i}" for i in range(num_tasks)]
    if not cfg.routed:
        num_tasks = len(names)  # an unrouted adapter serves any tasks; the names are a record
    elif len(names) != num_tasks:
        raise PeftInteropError(f"--tasks: {len(names)} names for an adapter routing {num_tasks} tasks (n_tasks)")
    model = meta_adapted(base, cfg, num_tasks, backbone if base_model is None else None)
    state = our_state(model, ours, cfg, source)

    def write(tmp: Path) -> None:
        write_export(
            tmp,
            state,
            cfg,
            names,
            num_tasks,
            extra={
                "backbone": backbone or {"name_or_path": base},
                "imported_from": {"format": "peft", "path": str(source), "peft_version": config.get("peft_version")},
            },
        )

    return atomic_folder(out, write)


def our_state(
    model: nn.Module, ours: dict[str, dict[str, torch.Tensor]], cfg: AdapterConfig, source: Path
) -> dict[str, torch.Tensor]:
    """Our export's tensors, every one the (meta) model expects, with its shape checked."""
    layers = adapter_layers(model)
    unknown = sorted(set(ours) - set(layers))
    if unknown:
        raise PeftInteropError(
            f"{source / PEFT_WEIGHTS_FILE}: adapters on {unknown[:3]} which the backbone does not "
            "have (or which are not Linear layers)"
        )
    missing = sorted(set(layers) - set(ours))
    if missing:
        raise PeftInteropError(f"{source / PEFT_WEIGHTS_FILE}: no tensors for {missing[:3]}")
    state: dict[str, torch.Tensor] = {}
    for name, parts in ours.items():
        for kind, value in parts.items():
            if kind == "logits":
                key = f"tpds_routing.{routing_key(name, cfg)}"
                state[f"{key}.logits"] = value
                state[f"{key}.uniform"] = torch.zeros((), dtype=torch.bool)
            else:
                state[f"{name}.{kind}"] = value
    check_state(model, state, source / PEFT_WEIGHTS_FILE)
    return state


def check_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    names = set(adapter_state_names(model))
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        raise PeftInteropError(
            f"{where}: tensors do not match the adapter config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key in names:
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise PeftInteropError(
                f"{where}: tensor {key!r} has shape {tuple(state[key].shape)}, the backbone "
                f"needs {tuple(expected[key].shape)}"
            )


# ---- files -------------------------------------------------------------------------------------------------
def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise PeftInteropError(f"{path}: cannot read adapter weights ({err})") from None


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeftInteropError(f"{out}: exists and is not empty (pass --force to replace it)")
