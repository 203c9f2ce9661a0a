"""`tensorpoly-ds report RUN_DIRS... --out DIR`: tables (Table 1 layout, parameter counts) and plots.

Writes DIR/report.md (everything, incl. the list of missing/failed jobs), table1.md/.csv, params.md/.csv,
accuracy.png and routing_<method>_<mode>.png. Missing or failed jobs are listed on stderr too; the
exit code is 0 unless --strict and something is missing.
"""

from __future__ import annotations

import argparse
import sys

from tensorpoly_ds.adapt.report import build_report
from tpds_common.errors import EXIT_FAILED, EXIT_OK, report_user_errors
from tpds_common.log import add_logging_arguments, setup_from_args

PROG = "tensorpoly-ds report"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="directories searched recursively for job results (and jobs.jsonl)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument(
        "--job-table",
        action="append",
        default=[],
        help="job table(s) whose rows must all have results (jobs.jsonl in RUN_DIRS are used anyway)",
    )
    p.add_argument(
        "--metric",
        choices=("final", "best"),
        default="final",
        help="accuracy of the final evaluation (default) or the best one",
    )
    p.add_argument(
        "--aggregate",
        choices=("median", "mean"),
        default="median",
        help="cells: median over seeds with its spread (TensorPoly's tables, default) or mean ± std (MHR's tables)",
    )
    p.add_argument("--spread", choices=("minmax", "iqr"), default="minmax", help="the spread shown with the median")
    p.add_argument(
        "--tasks",
        default=None,
        help="column order, comma-separated (e.g. the paper's: rte,cb,anli_r1,anli_r2,anli_r3,copa,"
        "hellaswag,story_cloze,wsc,winogrande,wic); other tasks follow alphabetically",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 if any job is missing, failed or incomplete")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    report = build_report(
        args.run_dirs,
        args.out,
        tables=args.job_table,
        metric=args.metric,
        spread=args.spread,
        plots=not args.no_plots,
        task_order=args.tasks.split(",") if args.tasks else None,
        aggregate_by=args.aggregate,
    )
    return EXIT_FAILED if (args.strict and report["problems"]) else EXIT_OK


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
