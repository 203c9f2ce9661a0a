"""`tensorpoly-ds <subcommand> ...`: dispatch only; each subcommand lives in its own module."""

from __future__ import annotations

import importlib
import sys

from tpds_common.errors import EXIT_OK, EXIT_USAGE, report_user_errors
from tpds_common.log import LOGGING_FLAGS, split_logging_flags

# name -> ("module" whose main(argv) runs it, or "module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "params": ("launch.params", "count multi-task and adaptation parameters (meta device)"),
    "plan": ("launch.plan", "per-GPU memory by component and the cheapest setting that fits (meta device)"),
    "prep": ("data_prep.cli", "stage 1: P3 mixtures -> tokenised, sharded Arrow datasets"),
    "pretrain": ("launch.pretrain", "stage 2: multi-task pretraining on DeepSpeed"),
    "lr-search": ("launch.lr_search", "choose pretraining learning rates on validation loss (one short run each)"),
    "adapt": ("launch.adapt", "stage 3: few-shot adaptation of one (task, seed) job, or a job-table row"),
    "sweep": ("launch.sweep", "expand a grid into a job table and run it with P workers"),
    "report": ("launch.report", "collect results into tables and plots"),
    "export": ("launch.interop:export_main", "write an adapter export in another format (peft)"),
    "import": ("launch.interop:import_main", "turn another format's adapter (peft) into an adapter export"),
    "demo": ("launch.demo", "the whole pipeline on the embedded mixture"),
    "replicate": ("launch.replicate", "the laptop-scale replication: every method, mode, task, k, seed; verdicts"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return (
        f"usage: tensorpoly-ds [--quiet | --verbose] [--log-all-ranks] [--progress] <subcommand> [args...]\n\n"
        f"subcommands:\n{rows}\n\n"
        "--quiet: warnings and errors only; --verbose: debug detail; --log-all-ranks: every rank logs, not only\n"
        "rank 0; --progress: progress bars also when stderr is not a terminal. Given before or after the\n"
        "subcommand, they mean the same (each subcommand accepts them).\n"
    )


def leading_logging_flags(argv: list[str]) -> list[str]:
    """`tensorpoly-ds --quiet sweep ...`: the logging flags before the subcommand, passed on to it."""
    n = 0
    while n < len(argv) and argv[n] in LOGGING_FLAGS:
        n += 1
    split_logging_flags(argv[:n])  # one definition of the flags: an invalid combination errors here too
    return list(argv[:n])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK
    lead = leading_logging_flags(argv)
    argv = argv[len(lead) :]
    if not argv:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"tensorpoly-ds: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    # The one place that maps errors to exit codes (tpds_common.errors): a UserError is one line and its
    # code, anything else a bug with its traceback. The subcommand's parser sets logging up (once).
    return report_user_errors(f"tensorpoly-ds {name}", lambda args: int(entry(args) or 0), lead + rest)


if __name__ == "__main__":
    sys.exit(main())
