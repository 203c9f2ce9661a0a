"""Thousands of tiny adaptation jobs, run in-process by a few long-lived workers.

A job on the tiny backbone trains for a few seconds; starting Python, torch and DeepSpeed for each would
cost more than the job. Each worker process imports everything once, pins its torch threads and runs
job after job through `tensorpoly_ds.adapt.job.run_job` (the local trainer), which writes result.json
and the COMPLETE marker; complete jobs are skipped, so an interrupted pool resumes where it stopped.

Why this is not the subprocess scheduler (`tensorpoly_ds.engine.scheduler`, which runs sweeps and pretraining
pools): that one starts a process per job, with its own session, port and environment, so that a stop can
SIGTERM the job's process group and the engine checkpoints; a start costs seconds, which a job of minutes or
hours does not notice. Here the start-up would dominate, the jobs are too short to checkpoint (one cut short
runs again from scratch), and nothing per job needs its own process. The report uses the scheduler's words
where they apply (`done`, `skipped`, `failed`; a failed job's line reads "<id>: FAILED (...), log ..."); there
is no `stopped`: an interrupted pool (Ctrl-C) terminates its workers and raises, and the rerun skips the
complete jobs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpds_common.errors import JobFailed
from tpds_common.log import capture, get_logger, progress

from ..adapt.job import is_complete


@dataclass
class PoolReport:
    """Indices of the rows per outcome, named as engine.scheduler.Outcome names them."""

    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # wall seconds per job run now


def _worker(threads: int, jobs, results) -> None:
    # own session: Ctrl-C reaches the parent only, and the parent decides when the workers stop
    # (JobPool.close); a job cut short has no COMPLETE marker and runs again next time
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
        # the job's messages go to its own log.txt, not to the terminal the workers share
        with open(out / "log.txt", "a") as fh, capture(lambda line: print(line, file=fh, flush=True)):
            try:
                run_job(AdaptJob.from_dict(job))
                results.put((index, None, time.monotonic() - t0))
            except Exception as err:  # noqa: BLE001 - reported per job; run_job wrote result.json (failed)
                results.put((index, f"{type(err).__name__}: {err}", time.monotonic() - t0))


class JobPool:
    """`workers` long-lived processes; `run(rows)` may be called several times (phases, variants) without
    paying their start-up (Python, torch, transformers imports) again. Use as a context manager."""

    def __init__(self, workers: int, threads: int = 1) -> None:
        self.workers, self.threads = workers, threads
        self.procs: list = []
        self.ctx = mp.get_context("spawn")  # no fork of a process that holds torch threads or a process group
        self.jobs, self.results = self.ctx.Queue(), self.ctx.Queue()

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if self.procs:
            return
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(self.threads)  # inherited by the spawned workers
        try:
            self.procs = [
                self.ctx.Process(target=_worker, args=(self.threads, self.jobs, self.results), daemon=True)
                for _ in range(self.workers)
            ]
            for p in self.procs:
                p.start()
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = previous

    def run(self, rows: list[dict], *, desc: str = "adapt") -> PoolReport:
        """Run every incomplete row (job-table rows: {"row", "id", "job"}); complete ones are skipped; `desc`
        names the batch in log lines (`[desc] ...`) and on the progress bar."""
        log = get_logger(desc)
        report = PoolReport()
        pending = []
        for i, row in enumerate(rows):
            (report.skipped if is_complete(row["job"]["out_dir"]) else pending).append(i)
        log.info(f"{len(rows)} jobs: {len(report.skipped)} complete, {len(pending)} to run on {self.workers} worker(s)")
        if not pending:
            return report
        self._start()
        for i in pending:
            self.jobs.put((i, rows[i]["job"]))
        try:
            with progress(total=len(pending), desc=desc, unit="job", dynamic_ncols=True) as bar:
                for _ in range(len(pending)):
                    index, error, seconds = _next_result(self.results, self.procs)
                    report.seconds[index] = seconds
                    if error is None:
                        report.done.append(index)
                    else:
                        report.failed[index] = error
                        out = Path(rows[index]["job"]["out_dir"])
                        log.warning(f"{rows[index]['id']}: FAILED ({error}), log {out / 'log.txt'}")
                    bar.update(1)
                    bar.set_postfix(failed=len(report.failed), refresh=False)
        except BaseException:
            self.close(force=True)  # interrupted: a running job has no COMPLETE marker and reruns next time
            raise
        return report

    def close(self, force: bool = False) -> None:
        if not force:
            for _ in self.procs:
                self.jobs.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self.procs = []


def _next_result(results, procs):
    import queue

    while True:
        try:
            return results.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise JobFailed(
                    "every adaptation worker exited before the jobs were done (killed? out of memory?); rerun to resume"
                ) from None
