"""Parameter accounting on the meta device: no download, no memory, seconds for T0-11B."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

import torch
from transformers import AutoModelForSeq2SeqLM, PretrainedConfig, T5ForConditionalGeneration

from .adapters import AdapterConfig, adapter_layers, inject_adapters, routing_tables
from .adapters.config import METHODS, ROUTINGS
from .models import KNOWN_ARCHITECTURES, resolve_config


def layer_type(name: str) -> str:
    """'decoder.block.3.layer.1.EncDecAttention.k' -> 'decoder.EncDecAttention.k'."""
    parts = name.split(".")
    side = "decoder" if "decoder" in parts else "encoder"
    return ".".join([side, *parts[-2:]])


def build_meta_model(model: str | PretrainedConfig):
    """The backbone with every parameter on the meta device (no storage): an architecture or Hub name, a
    config.json or model directory, or a config."""
    from accelerate import init_empty_weights

    config = model if isinstance(model, PretrainedConfig) else resolve_config(model)
    with init_empty_weights():
        net = T5ForConditionalGeneration(config) if config.model_type == "t5" else AutoModelForSeq2SeqLM.from_config(config)
    net.tie_weights()   # init_empty_weights re-creates every parameter, which unties shared embeddings
    return net


def count_parameters(model: str, cfg: AdapterConfig, num_tasks: int) -> dict:
    net = build_meta_model(model)
    inject_adapters(net, cfg, num_tasks)
    tables = routing_tables(net)
    per_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    modules_total = 0
    for name, layer in adapter_layers(net).items():
        n = sum(p.numel() for pname, p in layer.named_parameters() if not pname.startswith("base.") and p.requires_grad)
        row = per_type[layer_type(name)]
        row["layers"] += 1
        row["modules"] += n
        if layer.routing is not None and cfg.routing_granularity == "layer" and cfg.routing == "learned":
            row["routing"] += layer.routing.logits.numel()
            row["routing_per_task"] += layer.routing.heads * layer.routing.skills
        modules_total += n
    routing_total = sum(t.logits.numel() for t in tables.values())
    routing_per_task = sum(t.heads * t.skills for t in tables.values())
    adaptation = {"full": modules_total + routing_per_task, "z": routing_per_task, "mu": modules_total}
    if cfg.method in ("poly", "mhr"):
        # Uniform routing collapses the skills into one LoRA of rank r.
        adaptation["mu_collapsed"] = sum(cfg.rank * (l.in_features + l.out_features)
                                         for l in adapter_layers(net).values())
    if not cfg.routed:
        adaptation = {"full": modules_total}
    elif cfg.routing == "random":   # Random-mu: no routing parameters, only the uniform average adapts
        adaptation = {k: v for k, v in adaptation.items() if k.startswith("mu")}
    return {
        "model": model,
        "method": cfg.method,
        "adapter": cfg.to_dict(),
        "num_tasks": num_tasks,
        "adapted_layers": len(adapter_layers(net)),
        "routing_tables": len(tables),
        "multi_task": {"modules": modules_total, "routing": routing_total, "total": modules_total + routing_total},
        "adaptation": adaptation,
        "per_layer_type": {k: dict(v) for k, v in sorted(per_type.items())},
    }


# flag -> AdapterConfig field; unset flags keep the AdapterConfig (or run config) value
ADAPTER_FLAGS: dict[str, tuple[str, dict]] = {
    "--rank": ("rank", dict(type=int, help="LoRA rank r (default 1)")),
    "--tensor-rank": ("tensor_rank", dict(type=int, help="R: Kronecker terms / TT bond dimension (default 1)")),
    "--order": ("order", dict(type=int, help="N: Kronecker order / TT cores (default 2)")),
    "--skills": ("skills", dict(type=int, help="S: Poly/MHR skills (default 8)")),
    "--heads": ("heads", dict(type=int, help="h: MHR heads (default 1)")),
    "--targets": ("targets", dict(help="regex over module names (default: the method's T5 set)")),
    "--routing": ("routing", dict(choices=ROUTINGS,
                                  help="learned routing logits, or random (Random-mu: no routing parameters)")),
    "--routing-granularity": ("routing_granularity", dict(choices=("layer", "block", "group", "model"))),
    "--routing-group-size": ("routing_group_size", dict(type=int)),
    "--layernorm": ("layernorm", dict(action="store_const", const=True,
                                      help="TLoRA family: LayerNorm on Kronecker products")),
    "--layernorm-affine": ("layernorm_affine", dict(choices=("frozen", "trainable"))),
    "--output-gain": ("output_gain", dict(action="store_const", const=True,
                                          help="TLoRA family: a trainable scalar gain (init 0) on the adapter output")),
}


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("adapter options (AdapterConfig fields)")
    for flag, (dest, kwargs) in ADAPTER_FLAGS.items():
        group.add_argument(flag, dest=dest, default=None, **kwargs)


def adapter_fields(args: argparse.Namespace) -> dict:
    """The AdapterConfig fields set on the command line."""
    return {dest: getattr(args, dest) for dest, _ in ADAPTER_FLAGS.values() if getattr(args, dest) is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorpoly-ds params",
                                description="Count multi-task and adaptation parameters of an adapter configuration "
                                            "on the meta device (nothing is downloaded or allocated).")
    p.add_argument("--model", required=True,
                   help=f"{' | '.join(KNOWN_ARCHITECTURES)} | a Hugging Face config.json, model directory or name")
    p.add_argument("--method", required=True, choices=METHODS)
    add_adapter_arguments(p)
    p.add_argument("--tasks", type=int, default=313, help="number of multi-task training tasks (313 for T0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def format_table(report: dict) -> str:
    routing = ("random routing (no parameters)" if report["adapter"]["routing"] == "random"
               else f"{report['routing_tables']} routing tables")
    lines = [f"{report['method']} on {report['model']}: {report['adapted_layers']} adapted layers, "
             f"{routing}, {report['num_tasks']} tasks",
             f"{'layer type':<34}{'layers':>8}{'modules':>14}{'routing':>12}"]
    for name, row in report["per_layer_type"].items():
        lines.append(f"{name:<34}{row['layers']:>8}{row['modules']:>14,}{row.get('routing', 0):>12,}")
    mt = report["multi_task"]
    lines.append(f"multi-task: modules {mt['modules']:,} + routing {mt['routing']:,} = {mt['total']:,}")
    lines.append("adaptation: " + ", ".join(f"{k} {v:,}" for k, v in report["adaptation"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = AdapterConfig(method=args.method, **adapter_fields(args))
    report = count_parameters(args.model, cfg, args.tasks)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
