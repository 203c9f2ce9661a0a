"""Thousands of tiny adaptation jobs, run in-process by a few long-lived workers.

A job on the tiny backbone trains for a few seconds; starting Python, torch and DeepSpeed for each would
cost more than the job. Each worker process imports everything once, pins its torch threads and runs
job after job through `tensorpoly_ds.adapt.job.run_job` (the local trainer), which writes result.json
and the COMPLETE marker; complete jobs are skipped, so an interrupted pool resumes where it stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..adapt.job import is_complete


@dataclass
class PoolReport:
    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)   # wall seconds per job run now


def _worker(threads: int, jobs, results) -> None:
    # own session: Ctrl-C reaches the parent only, which then stops the workers (run_rows' finally), so a
    # job is never cut short between writing result.json and the COMPLETE marker by a stray SIGINT
    os.setsid()
    import torch

    torch.set_num_threads(threads)
    from ..adapt.job import AdaptJob, run_job

    while True:
        item = jobs.get()
        if item is None:
            return
        index, job = item
        t0 = time.monotonic()
        out = Path(job["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.txt", "a") as fh:
            try:
                run_job(AdaptJob.from_dict(job), log=lambda s: print(s, file=fh, flush=True))
                results.put((index, None, time.monotonic() - t0))
            except Exception as err:  # noqa: BLE001 - reported per job; run_job wrote result.json (failed)
                results.put((index, f"{type(err).__name__}: {err}", time.monotonic() - t0))


def run_rows(rows: list[dict], *, workers: int, threads: int = 1, desc: str = "adapt",
             log: Callable[[str], None] = print) -> PoolReport:
    """Run every incomplete row (job-table rows: {"row", "id", "job"}) with `workers` processes."""
    from tqdm import tqdm

    report = PoolReport()
    pending = []
    for i, row in enumerate(rows):
        (report.skipped if is_complete(row["job"]["out_dir"]) else pending).append(i)
    log(f"[{desc}] {len(rows)} jobs: {len(report.skipped)} complete, {len(pending)} to run on {workers} worker(s)")
    if not pending:
        return report
    ctx = mp.get_context("spawn")   # no fork of a process that holds torch threads or a process group
    jobs, results = ctx.Queue(), ctx.Queue()
    for i in pending:
        jobs.put((i, rows[i]["job"]))
    n = min(workers, len(pending))
    for _ in range(n):
        jobs.put(None)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)   # inherited by the spawned workers
    procs = [ctx.Process(target=_worker, args=(threads, jobs, results), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    if env_threads is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env_threads
    try:
        with tqdm(total=len(pending), desc=desc, unit="job", dynamic_ncols=True) as bar:
            for _ in range(len(pending)):
                index, error, seconds = _next_result(results, procs)
                report.seconds[index] = seconds
                if error is None:
                    report.done.append(index)
                else:
                    report.failed[index] = error
                    bar.write(f"[{desc}] FAILED {rows[index]['id']}: {error}")
                bar.update(1)
                bar.set_postfix(failed=len(report.failed), refresh=False)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()   # interrupted: a running job has no COMPLETE marker and reruns next time
        for p in procs:
            p.join(timeout=10)
    return report


def _next_result(results, procs):
    import queue

    while True:
        try:
            return results.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("every adaptation worker exited before the jobs were done (killed? "
                                   "out of memory?); rerun to resume") from None
