"""`tensorpoly-ds plan`: per-GPU memory of a pretraining run by component, over 1..N GPUs, and the cheapest
setting that fits a GPU size, before the queue wait.

    tensorpoly-ds plan --config configs/pretrain/base_t0_3b.yaml --config configs/pretrain/base_t0_11b.yaml \\
        --config configs/pretrain/tensorpoly_i_R8_N4.yaml --gpus 8 --gpu-mem 40GB
    tensorpoly-ds plan --model t0-3b --method poly --skills 8 --micro-batch 8 --precision bf16 --gpus 4

Everything is computed on the meta device (seconds, nothing downloaded or allocated).
"""

from __future__ import annotations

import argparse
import json
import sys

from tensorpoly_ds.plan.planner import (
    DEFAULT_LENGTH,
    T0_TASKS,
    PlanError,
    format_report,
    manifest_tasks,
    parse_size,
    plan,
)
from tpds_common.errors import EXIT_OK, report_user_errors
from tpds_common.log import add_logging_arguments, setup_from_args

PROG = "tensorpoly-ds plan"


def build_parser() -> argparse.ArgumentParser:
    from launch.params import add_adapter_arguments
    from tensorpoly_ds.adapters.config import METHODS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="pretraining run config(s), as for `pretrain`")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    p.add_argument("--model", help="t0-3b | t0-11b | tiny | a config.json, model directory or known Hub name")
    p.add_argument("--method", choices=(*METHODS, "fullft"), help="adapter method, or fullft (every parameter)")
    add_adapter_arguments(p)
    p.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="multi-task training tasks (routing rows); default: the manifest's of data.dir, else 313 (T0)",
    )
    p.add_argument("--micro-batch", type=int, help="per-GPU micro batch (train.micro_batch)")
    p.add_argument("--input-len", type=int, help=f"input tokens (data.max_input_len; default {DEFAULT_LENGTH})")
    p.add_argument("--target-len", type=int, help=f"target tokens (data.max_target_len; default {DEFAULT_LENGTH})")
    p.add_argument("--precision", choices=("bf16", "bf16_autocast", "fp32"))
    p.add_argument("--optimizer", choices=("adafactor", "adamw"))
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="the configured stage (table marks it)")
    p.add_argument("--offload-optimizer", action="store_const", const=True)
    p.add_argument("--offload-param", action="store_const", const=True)
    p.add_argument("--checkpointing", choices=("on", "off"), help="activation checkpointing of the configured run")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) of the run; the table covers 1..N")
    p.add_argument("--gpu-mem", help="GPU memory, e.g. 40GB: recommend the cheapest setting that fits")
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the device to plan for: its fused attention kernel decides what attention saves",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_logging_arguments(p)
    return p


def run_config(args):
    """The run config to plan: --config files, then the flags, then key=value overrides (as `pretrain`)."""
    from launch.params import adapter_fields
    from tensorpoly_ds.engine.config import load_run_config

    flags: list[str] = []
    if args.model:
        flags.append(f"model.name_or_path={args.model}")
    if args.method == "fullft":
        flags += ["adapter=null", "train.full_finetune=true"]
    elif args.method:
        flags += [f"adapter.method={args.method}", "train.full_finetune=false"]
    flags += [f"adapter.{k}={json.dumps(v)}" for k, v in adapter_fields(args).items()]
    for flag, key in (
        ("micro_batch", "train.micro_batch"),
        ("input_len", "data.max_input_len"),
        ("target_len", "data.max_target_len"),
        ("precision", "deepspeed.precision"),
        ("optimizer", "optim.name"),
        ("zero_stage", "deepspeed.zero_stage"),
        ("offload_optimizer", "deepspeed.offload_optimizer"),
        ("offload_param", "deepspeed.offload_param"),
    ):
        if getattr(args, flag) is not None:
            flags.append(f"{key}={json.dumps(getattr(args, flag))}")
    if args.checkpointing:
        flags.append(f"train.gradient_checkpointing={str(args.checkpointing == 'on').lower()}")
    return load_run_config(args.config, flags + list(args.overrides))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    # config, adapter and size errors are ConfigErrors naming the field and the value (exit 2)
    if args.gpus < 1:
        raise PlanError(f"--gpus {args.gpus}: must be >= 1")
    gpu_bytes = parse_size(args.gpu_mem) if args.gpu_mem else None
    cfg = run_config(args)
    report = plan(
        cfg,
        num_tasks=args.tasks or manifest_tasks(cfg) or T0_TASKS,
        gpus=args.gpus,
        gpu_bytes=gpu_bytes,
        device=args.device,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
