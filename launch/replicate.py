"""`tensorpoly-ds replicate`: the laptop-scale replication of the papers' claims, from one committed config.

    tensorpoly-ds replicate --config configs/replicate/full.yaml            # the whole grid (< 60 min, 2 CPUs)
    tensorpoly-ds replicate --config configs/replicate/ci.yaml --out /tmp/r  # the shrunk grid CI runs

Stages: prep -> backbone (T5-LM analogue, cached) -> multi-task pretraining of every method -> few-shot
and zero-shot adaptation (in-process worker pool) -> tables, claim verdicts, routing recovery, plots in
OUT/results/. Rerunning the same command resumes: finished stages and jobs are skipped. Exit status:
0 done, 1 a stage failed, 2 bad config, 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpds_common.log import add_logging_arguments, setup_from_args

STAGES = ("prep", "backbone", "pretrain", "adapt", "analyse")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorpoly-ds replicate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="replicate config (configs/replicate/*.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: the config's `out`)")
    p.add_argument("--workers", type=int, default=None, help="concurrent jobs (default: the config's `workers`)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {', '.join(STAGES)} (default: all; earlier stages must be done)")
    p.add_argument("--publish", default=None,
                   help="also copy results/*.json|md|png into this directory (e.g. benchmarks/results/replicate)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the config, e.g. adapt.steps=2 (part of the protocol)")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    from tensorpoly_ds.replicate.config import ReplicateConfigError, load_config
    from tensorpoly_ds.replicate.run import ProtocolMismatch, replicate

    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = sorted(stages - set(STAGES))
    if unknown:
        print(f"tensorpoly-ds replicate: unknown stage(s) {unknown}; valid: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, sets=args.overrides)
        if args.workers is not None and args.workers < 1:
            raise ReplicateConfigError(f"--workers {args.workers}: must be >= 1")
        replicate(cfg, Path(args.out or cfg.out), workers=args.workers, stages_to_run=stages,
                  publish=Path(args.publish) if args.publish else None)
    except (ReplicateConfigError, ProtocolMismatch) as err:
        print(f"tensorpoly-ds replicate: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tensorpoly-ds replicate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except RuntimeError as err:
        print(f"tensorpoly-ds replicate: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
