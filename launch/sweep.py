"""`tensorpoly-ds sweep`: expand a grid into a job table and run it locally with P workers.

    tensorpoly-ds sweep --grid configs/sweep_tiny.yaml --out runs/sweep --workers 2
    tensorpoly-ds sweep --grid ... --out runs/sweep --expand-only     # just write runs/sweep/jobs.jsonl
    sbatch --array=0-$((N-1)) slurm/adapt_array.sbatch runs/sweep/jobs.jsonl   # the same table on Slurm

Row i of OUT/jobs.jsonl is Slurm array task i. Each local job runs as its own subprocess
(`python -m launch.adapt --job-table OUT/jobs.jsonl --row i`) in its own process group, with its own
MASTER_PORT, a per-worker TORCH_EXTENSIONS_DIR ($TORCH_EXTENSIONS_DIR/worker<j>, or
OUT/.torch_extensions/worker<j>), and its log in <job out_dir>/log.txt. Complete jobs are skipped, so an
interrupted sweep rerun with the same grid only redoes unfinished jobs (a stopped one resumes from its
checkpoint).

Stopping: Ctrl-C, SIGTERM or SIGUSR1 stops every running job (SIGTERM to its process group: it finishes
its step, checkpoints, exits 124); the sweep lists the rows that remain and exits 130 (Ctrl-C) or 124.
A second Ctrl-C kills the jobs at once. If the sweep itself is killed (kill -9), its jobs get SIGTERM
from the kernel (PR_SET_PDEATHSIG) and stop the same way: no orphan keeps training.
Concurrency: OUT is locked for the sweep's lifetime (a second sweep on it exits 75, naming the holder),
and each job folder has its own lock, held by the `adapt` process running it: a row held by another live
process (an array task, a job still checkpointing after a killed sweep) is waited for, never run twice.
The jobs run through tensorpoly_ds.adapt.table.run_table (on tensorpoly_ds.engine.scheduler, as pretraining
pools do); this module parses, expands, and reports.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from tensorpoly_ds.adapt.table import TableError, expand_grid, read_grid, read_table, run_table, write_table
from tensorpoly_ds.engine.stop import STOP
from tpds_common.config import apply_overrides
from tpds_common.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REQUEUE, report_user_errors
from tpds_common.locking import FolderLock
from tpds_common.log import add_logging_arguments, get_logger, setup_from_args

PROG = "tensorpoly-ds sweep"
TABLE_FILE = "jobs.jsonl"
log = get_logger("sweep")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", help="YAML or JSON grid (base, methods, modes, tasks, seeds, ks); see docs/adapt.md")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the grid, e.g. base.steps=20 seeds=[0] (tpds_common.config)",
    )
    p.add_argument("--table", help="run an existing job table instead of expanding a grid")
    p.add_argument("--out", required=True, help="sweep directory: jobs.jsonl and jobs/<id>/ go here")
    p.add_argument("--workers", "-P", type=int, default=1, help="concurrent local jobs (default 1)")
    p.add_argument("--expand-only", action="store_true", help="write the job table and exit")
    p.add_argument("--rows", default=None, help="only these rows, e.g. 0,3-5 (default: all)")
    p.add_argument(
        "--threads-per-job", type=int, default=None, help="OMP/torch threads per job (default: CPUs // workers)"
    )
    p.add_argument(
        "--stop-grace",
        type=float,
        default=120.0,
        help="seconds stopped jobs get to checkpoint before they are killed (default 120)",
    )
    add_logging_arguments(p)
    return p


def parse_rows(spec: str | None, n: int) -> list[int]:
    if spec is None:
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise TableError(f"--rows {spec!r}: {part!r} is not a row number or a range like 3-5")
        rng = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        for r in rng:
            if not 0 <= r < n:
                raise TableError(f"--rows: row {r} out of range 0..{n - 1}")
            out.append(r)
    return sorted(set(out))


def main(argv: list[str] | None = None) -> int:
    with STOP.handling():  # Ctrl-C / SIGTERM / SIGUSR1: stop the jobs in order (run_table)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    out = Path(args.out).resolve()
    lock = FolderLock(out, what="sweep directory")
    lock.acquire()  # LockHeld: another live sweep holds OUT (exit 75)
    try:
        return _sweep(args, out)
    finally:
        lock.release()


def _sweep(args, out: Path) -> int:
    if args.table:
        table = Path(args.table).resolve()
        rows = read_table(table)
    elif args.grid:
        grid = apply_overrides(read_grid(args.grid), args.overrides, {}, TableError)
        rows = expand_grid(grid, out, base_dir=Path(args.grid).resolve().parent, source=args.grid)
        table = write_table(out / TABLE_FILE, rows)
    else:
        raise TableError("give --grid (expand and run) or --table (run an existing table)")
    selected = parse_rows(args.rows, len(rows))
    print(f"[sweep] job table {table}: {len(rows)} rows (Slurm: --array=0-{len(rows) - 1})")
    if args.expand_only:
        return EXIT_OK
    workers = max(1, args.workers)
    threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // workers)
    try:
        status = run_table(table, out, rows, selected, workers, threads, stop_grace=args.stop_grace)
    except KeyboardInterrupt:
        print(
            "[sweep] aborted by a second Ctrl-C: running jobs were killed (they restart from scratch)", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    (log.warning if status["failed"] else log.info)(
        f"done {len(status['done'])}, skipped (complete) {len(status['skipped'])}, "
        f"failed {len(status['failed'])}" + (f": rows {sorted(status['failed'])}" if status["failed"] else "")
    )
    if STOP.signal is not None:
        remaining = sorted(status["stopped"] + status["killed"] + status["not_started"] + status["failed"])
        print(
            f"[sweep] stopped by {STOP.name}: rows remaining {remaining} (checkpointed: {sorted(status['stopped'])}, "
            f"killed: {sorted(status['killed'])}, not started: {status['not_started']}); rerun the same command "
            "to finish them",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED if STOP.signal == signal.SIGINT else EXIT_REQUEUE
    return EXIT_OK if not status["failed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
