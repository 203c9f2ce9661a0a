"""Adapter health of every learning-rate candidate of a replication's search: for each method and candidate, the
ratio |delta W x| / |W0 x| (mean over adapted layers) and the adapter gradient norm at the first and the last
training step, the final train loss and the final multi-task val loss, read from the runs' metrics.jsonl.

    python benchmarks/replicate_health.py runs/replicate/v2 --out benchmarks/results/replicate_v2/health.json

It explains a "did not train" row from numbers the engine logs anyway (train.adapter_health, on by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpds_common.files import atomic_write_json  # noqa: E402


def candidate_health(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train" and "train/delta_ratio/mean" in r]
    evals = [r for r in rows if r.get("kind") == "eval" and "val/loss" in r]
    if not train:
        return None
    first, last = train[0], train[-1]
    return {
        "delta_ratio": [first["train/delta_ratio/mean"], last["train/delta_ratio/mean"]],
        "adapter_grad_norm": [first["train/adapter_grad_norm/modules"], last["train/adapter_grad_norm/modules"]],
        "train_loss": [first["train/loss"], last["train/loss"]],
        "steps": last["step"],
        "val_loss": evals[-1]["val/loss"] if evals else None,
    }


def collect(out: Path) -> dict:
    table: dict[str, dict[str, dict]] = {}
    for method_dir in sorted(out.glob("worlds/*/lr_search/*/*")) + sorted(out.glob("lr_search/*/*")):
        for run_dir in sorted((method_dir / "runs").glob("*")):
            health = candidate_health(run_dir)
            if health is not None:
                table.setdefault(method_dir.name, {})[run_dir.name] = health
    return table


def format_table(table: dict) -> str:
    lines = [f"{'method':<24}{'candidate':<36}{'ratio first->last':>20}{'grad first->last':>20}{'val loss':>10}"]
    for method, runs in table.items():
        for name, h in runs.items():
            r, g = h["delta_ratio"], h["adapter_grad_norm"]
            val = "-" if h["val_loss"] is None else f"{h['val_loss']:.3f}"
            lines.append(
                f"{method:<24}{name:<36}{f'{r[0]:.2f} -> {r[1]:.2f}':>20}{f'{g[0]:.1f} -> {g[1]:.2f}':>20}{val:>10}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a replication's output directory (with lr_search runs)")
    p.add_argument("--out-json", "--out", dest="json_out", required=True, help="where to write the JSON")
    args = p.parse_args(argv)
    table = collect(Path(args.out))
    if not table:
        print(f"no lr-search runs with health metrics under {args.out}", file=sys.stderr)
        return 2
    print(format_table(table))
    atomic_write_json(Path(args.json_out), {"source": str(args.out), "methods": table})
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
