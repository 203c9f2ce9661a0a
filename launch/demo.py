"""The demo: the whole pipeline on the embedded mixture (stages run as they exist)."""

from __future__ import annotations

import argparse
import sys

from tensorpoly_ds.adapters import AdapterConfig
from tensorpoly_ds.params import count_parameters

PAPER_METHODS = [
    ("LoRA r=1", AdapterConfig(method="lora", rank=1)),
    ("TLoRA r=16 R=1 N=2", AdapterConfig(method="tlora", rank=16, tensor_rank=1, order=2)),
    ("Poly S=8 r=1", AdapterConfig(method="poly", skills=8, rank=1)),
    ("MHR S=8 h=64 r=1", AdapterConfig(method="mhr", skills=8, heads=64, rank=1)),
    ("TensorPoly-I R=8 N=2", AdapterConfig(method="tensorpoly_i", rank=16, tensor_rank=8, order=2)),
    ("TensorPoly-I R=8 N=4", AdapterConfig(method="tensorpoly_i", rank=16, tensor_rank=8, order=4)),
    ("TensorPoly-II R=8 N=2", AdapterConfig(method="tensorpoly_ii", rank=16, tensor_rank=8, order=2)),
    ("(IA)^3", AdapterConfig(method="ia3")),
]


def parameter_table(model: str = "t0-3b", tasks: int = 313) -> str:
    rows = [f"{'method':<24}{'multi-task':>14}{'adapt (full)':>14}{'adapt (z)':>12}"]
    for label, cfg in PAPER_METHODS:
        report = count_parameters(model, cfg, tasks)
        adapt = report["adaptation"]
        rows.append(f"{label:<24}{report['multi_task']['total']:>14,}{adapt['full']:>14,}{adapt.get('z', 0):>12,}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorpoly-ds demo", description=__doc__)
    parser.parse_args(argv)
    print("Parameter counts on T0-3B with 313 training tasks (meta device, nothing downloaded):")
    print(parameter_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
