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
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorpoly_ds.adapt.spec import is_complete
from tensorpoly_ds.adapt.table import TableError, expand_grid, read_grid, read_table, write_table
from tensorpoly_ds.engine.job_env import REPO_ROOT, job_env
from tensorpoly_ds.engine.stop import STOP
from tpds_common.config import apply_overrides
from tpds_common.errors import EXIT_BUSY, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REQUEUE, report_user_errors
from tpds_common.locking import FolderLock, describe, holder_if_locked
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


def run_table(
    table: Path, out: Path, rows: list[dict], selected: list[int], workers: int, threads: int, stop_grace: float = 120.0
) -> dict[str, list[int]]:
    """Run the selected rows with `workers` concurrent jobs. Returns {"skipped", "done", "failed",
    "stopped" (checkpointed by a stop request), "killed", "not_started"}; "stopped" is set by a stop request
    (STOP, installed by main)."""
    status: dict[str, list[int]] = {
        "skipped": [],
        "done": [],
        "failed": [],
        "stopped": [],
        "killed": [],
        "not_started": [],
    }
    pending: list[int] = []
    for i in selected:
        if is_complete(rows[i]["job"]["out_dir"]):
            status["skipped"].append(i)
        else:
            pending.append(i)
    log.info(f"{len(selected)} rows: {len(status['skipped'])} complete, {len(pending)} to run, {workers} worker(s)")
    running: dict[int, tuple[int, subprocess.Popen, object]] = {}  # worker slot -> (row, proc, log file)
    free_slots = list(range(workers))[::-1]
    waiting: dict[int, float] = {}  # row held by another live process -> when to look again

    def job_dir(row: int) -> Path:
        return Path(rows[row]["job"]["out_dir"])

    def wait_for(row: int, holder: dict) -> None:
        if row not in waiting:
            log.info(f"row {row} {rows[row]['id']}: held by {describe(holder)}; waiting for it")
        waiting[row] = time.monotonic() + 2.0

    def reap(block: bool) -> None:
        for slot, (row, proc, fh) in list(running.items()):
            if block:
                proc.wait()
            if proc.poll() is None:
                continue
            fh.close()
            rc = proc.returncode
            if is_complete(job_dir(row)):  # final, whatever happened after (a stop during interpreter exit)
                status["done"].append(row)
                log.info(f"row {row} {rows[row]['id']}: done")
            elif rc == EXIT_REQUEUE:
                status["stopped"].append(row)
                log.info(f"row {row} {rows[row]['id']}: stopped with a checkpoint (resumes on rerun)")
            elif rc == EXIT_BUSY:  # another process took the row between our check and the job's start
                wait_for(row, holder_if_locked(job_dir(row)) or {})
            elif rc < 0 and STOP.signal is not None:
                status["killed"].append(row)
                log.warning(f"row {row} {rows[row]['id']}: killed ({signal.Signals(-rc).name}) before it checkpointed")
            else:
                status["failed"].append(row)
                log.warning(f"row {row} {rows[row]['id']}: FAILED (exit {rc}), log {job_dir(row) / 'log.txt'}")
            del running[slot]
            free_slots.append(slot)

    def next_row() -> int | None:
        now = time.monotonic()
        for row in [r for r, t in waiting.items() if t <= now]:  # held rows whose holder may be gone
            holder = holder_if_locked(job_dir(row))
            if holder is None:
                del waiting[row]
                if is_complete(job_dir(row)):
                    status["skipped"].append(row)
                else:
                    pending.insert(0, row)
            else:
                wait_for(row, holder)
        while pending:
            row = pending.pop(0)
            holder = holder_if_locked(job_dir(row))
            if holder is None:
                return row
            wait_for(row, holder)
        return None

    def start(slot: int, row: int) -> None:
        job_out = job_dir(row)
        job_out.mkdir(parents=True, exist_ok=True)
        fh = open(job_out / "log.txt", "a")
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} row {row} worker {slot}\n")
        fh.flush()
        cmd = [sys.executable, "-m", "launch.adapt", "--job-table", str(table), "--row", str(row)]
        # a session (process group) of its own: a stop reaches the job and its children, and the
        # terminal's Ctrl-C reaches only the sweep, which stops the jobs in order
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=job_env(out, slot, threads),
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
        running[slot] = (row, proc, fh)
        log.debug(f"row {row} {rows[row]['id']}: started on worker {slot} (pid {proc.pid})")

    def signal_all(sig: int) -> None:
        for _, proc, _ in running.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    try:
        while (pending or running or waiting) and STOP.signal is None:
            while free_slots and STOP.signal is None:
                row = next_row()
                if row is None:
                    break
                start(free_slots.pop(), row)
            time.sleep(0.2)
            reap(block=False)
        if STOP.signal is not None:
            log.info(f"{STOP.name}: stopping {len(running)} running job(s) (they checkpoint; up to {stop_grace:.0f} s)")
            signal_all(signal.SIGTERM)
            deadline = time.monotonic() + stop_grace
            while running and time.monotonic() < deadline:
                time.sleep(0.2)
                reap(block=False)
            if running:
                log.warning(f"{len(running)} job(s) still running after {stop_grace:.0f} s: killing them")
                signal_all(signal.SIGKILL)
                reap(block=True)
    except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
        log.warning("second Ctrl-C: killing the running jobs")
        signal_all(signal.SIGKILL)
        reap(block=True)
        status["not_started"] = sorted(pending + list(waiting))
        raise
    status["not_started"] = sorted(pending + list(waiting))
    return status


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
