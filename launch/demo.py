"""The demo: a slice of the laptop-scale replication, every stage for real, on this machine's CPUs.

  1. prep      the latent-skill benchmark (tasks = known compositions of skills; held-out = unseen ones)
  2. backbone  a tiny T5 trained on generic word sequences of the same vocabulary (the T5-LM analogue)
  3. pretrain  multi-task pretraining of a few adapter methods on the frozen backbone (`tensorpoly-ds pretrain`)
  4. adapt     few-shot adaptation to the held-out tasks: methods x modes x tasks x seeds x lrs, in-process workers
  5. analyse   Table 1 (median over seeds), claim verdicts, routing recovery against the true task-skill matrix

It is `tensorpoly-ds replicate` with configs/replicate/demo.yaml, a slice of protocol v2 (configs/replicate/v2.yaml).
Everything lands in runs/demo/ (`--out`); rerunning skips what is done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpds_common.errors import EXIT_OK, report_user_errors
from tpds_common.log import add_logging_arguments, logging_argv, setup_from_args

PROG = "tensorpoly-ds demo"
ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "replicate" / "demo.yaml"
# the headline ends at the first of these sections after Table 1 (the rest is in summary.md)
HEADLINE_ENDS = (
    "### Spread across worlds",
    "### Multi-task pretraining",
    "### What the rows answered",
    "### Learning rate per row",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="everything goes below this folder (default: runs/demo)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="replicate config (default: configs/replicate/demo.yaml)")
    p.add_argument("--workers", type=int, default=None, help="concurrent jobs (default: the config's, 2)")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    from launch.replicate import main as replicate_main

    cmd = ["--config", args.config, "--out", args.out] + (["--workers", str(args.workers)] if args.workers else [])
    cmd += logging_argv(args)
    code = replicate_main(cmd)
    summary = Path(args.out) / "results" / "summary.md"
    if code == EXIT_OK and summary.is_file():
        text = summary.read_text()
        # the headline: the first Table 1 and the claim table that follows it
        start = text.find("### Table 1 analogue")
        ends = [i for i in (text.find(h, start) for h in HEADLINE_ENDS) if i > start]
        print("\n" + text[start : min(ends, default=None)].strip() + "\n")
        print(f"demo: full results in {summary.parent} (summary.md, results.json, *.png)")
    return code


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
