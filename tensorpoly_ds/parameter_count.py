"""Parameter accounting on the meta device: no download, no memory, seconds for T0-11B
(`tensorpoly-ds params`, launch/params.py)."""

from __future__ import annotations

from collections import defaultdict

from .adapters import AdapterConfig, adapter_layers, inject_adapters, routing_tables
from .models import build_meta_model


def layer_type(name: str) -> str:
    """'decoder.block.3.layer.1.EncDecAttention.k' -> 'decoder.EncDecAttention.k'."""
    parts = name.split(".")
    side = "decoder" if "decoder" in parts else "encoder"
    return ".".join([side, *parts[-2:]])


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
        adaptation["mu_collapsed"] = sum(
            cfg.rank * (l.in_features + l.out_features) for l in adapter_layers(net).values()
        )
    if not cfg.routed:
        adaptation = {"full": modules_total}
    elif cfg.routing == "random":  # Random-mu: no routing parameters, only the uniform average adapts
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


def format_table(report: dict) -> str:
    routing = (
        "random routing (no parameters)"
        if report["adapter"]["routing"] == "random"
        else f"{report['routing_tables']} routing tables"
    )
    lines = [
        f"{report['method']} on {report['model']}: {report['adapted_layers']} adapted layers, "
        f"{routing}, {report['num_tasks']} tasks",
        f"{'layer type':<34}{'layers':>8}{'modules':>14}{'routing':>12}",
    ]
    for name, row in report["per_layer_type"].items():
        lines.append(f"{name:<34}{row['layers']:>8}{row['modules']:>14,}{row.get('routing', 0):>12,}")
    mt = report["multi_task"]
    lines.append(f"multi-task: modules {mt['modules']:,} + routing {mt['routing']:,} = {mt['total']:,}")
    lines.append("adaptation: " + ", ".join(f"{k} {v:,}" for k, v in report["adaptation"].items()))
    return "\n".join(lines)
