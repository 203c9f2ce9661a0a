"""`tensorpoly-ds replicate`: the laptop-scale replication of the papers' claims, from one committed config.

    tensorpoly-ds replicate --config configs/replicate/full.yaml            # the whole grid (< 60 min, 2 CPUs)
    tensorpoly-ds replicate --config configs/replicate/ci.yaml --out /tmp/r  # the shrunk grid CI runs

Stages: prep -> backbone (T5-LM analogue, cached) -> multi-task pretraining of every method -> few-shot
and zero-shot adaptation (in-process worker pool) -> tables, claim verdicts, routing recovery, plots in
OUT/results/. Rerunning the same command resumes: finished stages and jobs are skipped. Exit status
(tpds_common.errors): 0 done, 1 a stage failed (one line naming it) or a bug (a traceback), 2 bad config,
130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpds_common.errors import EXIT_INTERRUPTED, EXIT_OK, ConfigError, report_user_errors
from tpds_common.log import add_logging_arguments, setup_from_args

PROG = "tensorpoly-ds replicate"
STAGES = ("prep", "backbone", "pretrain", "adapt", "analyse")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="replicate config (configs/replicate/*.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: the config's `out`)")
    p.add_argument("--workers", type=int, default=None, help="concurrent jobs (default: the config's `workers`)")
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {', '.join(STAGES)} (default: all; earlier stages must be done)",
    )
    p.add_argument(
        "--publish",
        default=None,
        help="also copy results/*.json|md|png into this directory (e.g. benchmarks/results/replicate)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the config, e.g. adapt.steps=2 (part of the protocol)",
    )
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    from tensorpoly_ds.replicate.config import ReplicateConfigError, load_config
    from tensorpoly_ds.replicate.run import replicate

    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = sorted(stages - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    cfg = load_config(args.config, sets=args.overrides)
    if args.workers is not None and args.workers < 1:
        raise ReplicateConfigError(f"--workers {args.workers}: must be >= 1")
    # A bad config or another protocol in OUT (exit 2), a failed stage (JobFailed, exit 1): report_user_errors
    try:
        replicate(
            cfg,
            Path(args.out or cfg.out),
            workers=args.workers,
            stages_to_run=stages,
            publish=Path(args.publish) if args.publish else None,
        )
    except KeyboardInterrupt:
        print("tensorpoly-ds replicate: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
