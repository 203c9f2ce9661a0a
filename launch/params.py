"""`tensorpoly-ds params`: count multi-task and adaptation parameters of an adapter configuration on the
meta device. Also the adapter flags `plan` shares."""

from __future__ import annotations

import argparse
import json
import sys

from tensorpoly_ds.adapters import AdapterConfig
from tensorpoly_ds.adapters.config import METHODS, ROUTINGS
from tensorpoly_ds.models import KNOWN_ARCHITECTURES
from tensorpoly_ds.parameter_count import count_parameters, format_table
from tpds_common.errors import EXIT_OK, report_user_errors
from tpds_common.log import add_logging_arguments, setup_from_args

PROG = "tensorpoly-ds params"

# flag -> AdapterConfig field; unset flags keep the AdapterConfig (or run config) value
ADAPTER_FLAGS: dict[str, tuple[str, dict]] = {
    "--rank": ("rank", dict(type=int, help="LoRA rank r (default 1)")),
    "--tensor-rank": ("tensor_rank", dict(type=int, help="R: Kronecker terms / TT bond dimension (default 1)")),
    "--order": ("order", dict(type=int, help="N: Kronecker order / TT cores (default 2)")),
    "--skills": ("skills", dict(type=int, help="S: Poly/MHR skills (default 8)")),
    "--heads": ("heads", dict(type=int, help="h: MHR heads (default 1)")),
    "--targets": ("targets", dict(help="regex over module names (default: the method's T5 set)")),
    "--routing": (
        "routing",
        dict(choices=ROUTINGS, help="learned routing logits, or random (Random-mu: no routing parameters)"),
    ),
    "--routing-granularity": ("routing_granularity", dict(choices=("layer", "block", "group", "model"))),
    "--routing-group-size": ("routing_group_size", dict(type=int)),
    "--layernorm": (
        "layernorm",
        dict(action="store_const", const=True, help="TLoRA family: LayerNorm on Kronecker products"),
    ),
    "--layernorm-affine": ("layernorm_affine", dict(choices=("frozen", "trainable"))),
    "--output-gain": (
        "output_gain",
        dict(
            action="store_const",
            const=True,
            help="TLoRA family: a trainable scalar gain (init 0) on the adapter output",
        ),
    ),
}


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("adapter options (AdapterConfig fields)")
    for flag, (dest, kwargs) in ADAPTER_FLAGS.items():
        group.add_argument(flag, dest=dest, default=None, **kwargs)


def adapter_fields(args: argparse.Namespace) -> dict:
    """The AdapterConfig fields set on the command line."""
    return {dest: getattr(args, dest) for dest, _ in ADAPTER_FLAGS.values() if getattr(args, dest) is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Count multi-task and adaptation parameters of an adapter configuration "
        "on the meta device (nothing is downloaded or allocated).",
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"{' | '.join(KNOWN_ARCHITECTURES)} | a Hugging Face config.json, model directory or name",
    )
    p.add_argument("--method", required=True, choices=METHODS)
    add_adapter_arguments(p)
    p.add_argument("--tasks", type=int, default=313, help="number of multi-task training tasks (313 for T0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    cfg = AdapterConfig(method=args.method, **adapter_fields(args))
    report = count_parameters(args.model, cfg, args.tasks)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
