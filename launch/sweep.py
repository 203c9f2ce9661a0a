"""`tensorpoly-ds sweep`: expand a grid into a job table and run it locally with P workers.

    tensorpoly-ds sweep --grid configs/sweep_tiny.yaml --out runs/sweep --workers 2
    tensorpoly-ds sweep --grid ... --out runs/sweep --expand-only     # just write runs/sweep/jobs.jsonl
    sbatch --array=0-$((N-1)) slurm/adapt_array.sbatch runs/sweep/jobs.jsonl   # the same table on Slurm

Row i of OUT/jobs.jsonl is Slurm array task i. Each local job runs as its own subprocess
(`python -m launch.adapt --job-table OUT/jobs.jsonl --row i`) with its own MASTER_PORT, a per-worker
TORCH_EXTENSIONS_DIR ($TORCH_EXTENSIONS_DIR/worker<j>, or OUT/.torch_extensions/worker<j>), and its log in <job out_dir>/log.txt. Complete jobs are skipped, so an
interrupted sweep rerun with the same grid only redoes unfinished jobs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tensorpoly_ds.adapt.job import JobError, is_complete
from tensorpoly_ds.adapt.table import TableError, expand_grid, read_grid, read_table, write_table

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_FILE = "jobs.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorpoly-ds sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", help="YAML or JSON grid (base, methods, modes, tasks, seeds, ks); see docs/adapt.md")
    p.add_argument("--table", help="run an existing job table instead of expanding a grid")
    p.add_argument("--out", required=True, help="sweep directory: jobs.jsonl and jobs/<id>/ go here")
    p.add_argument("--workers", "-P", type=int, default=1, help="concurrent local jobs (default 1)")
    p.add_argument("--expand-only", action="store_true", help="write the job table and exit")
    p.add_argument("--rows", default=None, help="only these rows, e.g. 0,3-5 (default: all)")
    p.add_argument("--threads-per-job", type=int, default=None,
                   help="OMP/torch threads per job (default: CPUs // workers)")
    return p


def parse_rows(spec: str | None, n: int) -> list[int]:
    if spec is None:
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        rng = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        for r in rng:
            if not 0 <= r < n:
                raise TableError(f"--rows: row {r} out of range 0..{n - 1}")
            out.append(r)
    return sorted(set(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(out: Path, worker: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    # one build cache per worker slot (concurrent JIT builds clash on the lock, REFERENCE pitfall 9), under
    # $TORCH_EXTENSIONS_DIR when set (reused across sweeps), else under the sweep directory
    base = Path(os.environ["TORCH_EXTENSIONS_DIR"]) if os.environ.get("TORCH_EXTENSIONS_DIR") else out / ".torch_extensions"
    env["TORCH_EXTENSIONS_DIR"] = str(base / f"worker{worker}")
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)   # a local worker is a single process; the row comes from --row
    return env


def run_table(table: Path, out: Path, rows: list[dict], selected: list[int], workers: int, threads: int,
              log=print) -> dict[str, list[int]]:
    status: dict[str, list[int]] = {"skipped": [], "done": [], "failed": []}
    pending = []
    for i in selected:
        if is_complete(rows[i]["job"]["out_dir"]):
            status["skipped"].append(i)
        else:
            pending.append(i)
    log(f"[sweep] {len(selected)} rows: {len(status['skipped'])} complete, {len(pending)} to run, "
        f"{workers} worker(s)")
    running: dict[int, tuple[int, subprocess.Popen, object]] = {}   # worker slot -> (row, proc, log file)
    free_slots = list(range(workers))[::-1]

    def reap(block: bool) -> None:
        for slot, (row, proc, fh) in list(running.items()):
            if block:
                proc.wait()
            if proc.poll() is None:
                continue
            fh.close()
            ok = proc.returncode == 0 and is_complete(rows[row]["job"]["out_dir"])
            status["done" if ok else "failed"].append(row)
            log(f"[sweep] row {row} {rows[row]['id']}: {'done' if ok else f'FAILED (exit {proc.returncode})'}"
                + ("" if ok else f", log {Path(rows[row]['job']['out_dir']) / 'log.txt'}"))
            del running[slot]
            free_slots.append(slot)

    try:
        while pending or running:
            while pending and free_slots:
                slot, row = free_slots.pop(), pending.pop(0)
                job_out = Path(rows[row]["job"]["out_dir"])
                job_out.mkdir(parents=True, exist_ok=True)
                fh = open(job_out / "log.txt", "a")
                fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} row {row} worker {slot}\n")
                fh.flush()
                cmd = [sys.executable, "-m", "launch.adapt", "--job-table", str(table), "--row", str(row)]
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=job_env(out, slot, threads),
                                        cwd=str(REPO_ROOT), start_new_session=True)
                running[slot] = (row, proc, fh)
                log(f"[sweep] row {row} {rows[row]['id']}: started on worker {slot} (pid {proc.pid})")
            time.sleep(0.2)
            reap(block=False)
    except KeyboardInterrupt:
        log("[sweep] interrupted: stopping running jobs (rerun the sweep to finish the rest)")
        for _, proc, _ in running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 30
        for _, proc, _ in running.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        reap(block=True)
        raise
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    try:
        if args.table:
            table = Path(args.table).resolve()
            rows = read_table(table)
        elif args.grid:
            grid = read_grid(args.grid)
            rows = expand_grid(grid, out, base_dir=Path(args.grid).resolve().parent, source=args.grid)
            table = write_table(out / TABLE_FILE, rows)
        else:
            raise TableError("give --grid (expand and run) or --table (run an existing table)")
        selected = parse_rows(args.rows, len(rows))
    except (TableError, JobError, OSError, ValueError) as err:
        print(f"tensorpoly-ds sweep: {err}", file=sys.stderr)
        return 2
    print(f"[sweep] job table {table}: {len(rows)} rows (Slurm: --array=0-{len(rows) - 1})")
    if args.expand_only:
        return 0
    workers = max(1, args.workers)
    threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // workers)
    def on_term(signum, frame):   # scancel / kill: stop the jobs like Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        status = run_table(table, out, rows, selected, workers, threads)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"[sweep] done {len(status['done'])}, skipped (complete) {len(status['skipped'])}, "
          f"failed {len(status['failed'])}" + (f": rows {sorted(status['failed'])}" if status["failed"] else ""))
    return 0 if not status["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
