"""One scheduler for local subprocess jobs: the rows of a sweep (`tensorpoly_ds.adapt.table.run_table`) and the
pretraining runs of a pool (`engine.run_pool.run_pretraining`, used by replicate and lr-search).

A `Job` is a command with its log file, a `done()` predicate and, optionally, a probe that names another live
process holding the job's folder. `Scheduler(jobs, ...).run()` skips the done ones, runs the rest `workers` at a
time, each in its own subprocess and session (process group) with the environment of its worker slot
(`job_env`: rendezvous port, threads, build cache, parent pid), and classifies each job once it exits:

    done         done() holds, whatever the exit status (a stop may land after the last write)
    stopped      exit 124 (EXIT_REQUEUE): it checkpointed on a stop request; a rerun resumes it
    busy         exit 75 (EXIT_BUSY) or its probe names a holder: waited for, looked at again every
                 `recheck_s`, run when the holder is gone (skipped if the holder finished it)
    killed       killed by our own stop (after the grace, or a second Ctrl-C) before it checkpointed
    failed       anything else; its log says why
    not_started  a stop came first, or another process still held it when the scheduler ended

Stopping is the same for every user: a stop request (`STOP`: SIGINT, SIGTERM, SIGUSR1, installed here when
called from the main thread) sends SIGTERM to each running job's process group; the jobs checkpoint and exit
124 within `stop_grace` seconds, or are killed (SIGKILL). A KeyboardInterrupt (a second Ctrl-C at least a
second after the first) kills the running jobs at once and propagates. The report carries the stop signal, so
the caller decides its own exit status (the sweep's 124/130, `JobsStopped` for a pool).
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import Logger
from pathlib import Path
from typing import Any

from tpds_common.errors import EXIT_BUSY, EXIT_INTERRUPTED, EXIT_REQUEUE, JobFailed, UserError
from tpds_common.locking import describe

from .job_env import REPO_ROOT, job_env
from .stop import STOP


class Outcome(enum.Enum):
    SKIPPED = "skipped"  # done before it was started
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"  # checkpointed on a stop request (exit 124)
    KILLED = "killed"
    NOT_STARTED = "not_started"
    BUSY = "busy"  # held by another live process: waited for; never final (not_started if still held at the end)


FINAL = [o for o in Outcome if o is not Outcome.BUSY]


class JobsStopped(UserError, RuntimeError):
    """Jobs were stopped (a stop request, or a job's own time budget) before all were done; they checkpointed
    where they could and the same command resumes them. Exit 130 after Ctrl-C, else 124 ("requeue me")."""

    def __init__(self, message: str, stop_signal: int | None) -> None:
        super().__init__(message)
        self.exit_code = EXIT_INTERRUPTED if stop_signal == signal.SIGINT else EXIT_REQUEUE


@dataclass
class Job:
    name: str  # in log lines; unique among the jobs of one scheduler
    argv: Sequence[str]
    log: Path  # appended to: the job's stdout and stderr, after a header line per start
    done: Callable[[], bool]
    holder: Callable[[], dict | None] | None = None  # another live process holding the job, or None
    cwd: Path = REPO_ROOT
    key: Any = None  # the caller's handle on the job (a row index, a run)


@dataclass
class Report:
    outcomes: dict[Outcome, list[Job]] = field(default_factory=lambda: {o: [] for o in FINAL})
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per job that ran (the last try)
    stop_signal: int | None = None  # the stop request that ended the run, if any

    def keys(self, outcome: Outcome) -> list:
        return [j.key for j in self.outcomes[outcome]]

    def names(self, outcome: Outcome) -> list[str]:
        return [j.name for j in self.outcomes[outcome]]

    @property
    def stop_name(self) -> str:
        return signal.Signals(self.stop_signal).name if self.stop_signal is not None else ""

    @property
    def unfinished(self) -> bool:
        return any(self.outcomes[o] for o in (Outcome.STOPPED, Outcome.KILLED, Outcome.NOT_STARTED))


def classify(job: Job, returncode: int, stopping: bool) -> Outcome:
    """What a job's exit means (the table in the module docstring); `stopping`: we signalled it."""
    if job.done():
        return Outcome.DONE
    if returncode == EXIT_REQUEUE:
        return Outcome.STOPPED
    if returncode == EXIT_BUSY and job.holder is not None:  # taken by another process between probe and start
        return Outcome.BUSY
    if returncode < 0 and stopping:
        return Outcome.KILLED
    return Outcome.FAILED


def raise_unless_done(report: Report, what: str) -> None:
    """A pool's verdict: JobsStopped when jobs remain after a stop, JobFailed naming failed jobs."""
    if report.stop_signal is not None or report.unfinished:
        by = f" by {report.stop_name}" if report.stop_signal is not None else ""
        raise JobsStopped(
            f"{what} stopped{by}: checkpointed {report.names(Outcome.STOPPED)}, killed {report.names(Outcome.KILLED)}, "
            f"not started {report.names(Outcome.NOT_STARTED)}, failed {report.names(Outcome.FAILED)}; "
            "rerun the same command to resume",
            report.stop_signal,
        )
    if report.outcomes[Outcome.FAILED]:
        raise JobFailed(f"{what} failed for {report.names(Outcome.FAILED)} (see their log.txt)")


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    log: Any  # the open log file
    started: float


class Scheduler:
    """Runs `jobs` (see the module docstring). `scratch`: where per-slot build caches go when
    TORCH_EXTENSIONS_DIR is unset; `shared_build_cache`: every slot uses $TORCH_EXTENSIONS_DIR itself (the
    caller built the op before). `pending`/`skipped` are known after construction, before `run()`."""

    def __init__(
        self,
        jobs: Sequence[Job],
        *,
        workers: int,
        threads: int,
        scratch: Path,
        log: Logger,
        stop_grace: float = 120.0,
        shared_build_cache: bool = False,
        poll_s: float = 0.2,
        recheck_s: float = 2.0,
    ) -> None:
        self.workers, self.threads, self.scratch, self.log = workers, threads, scratch, log
        self.stop_grace, self.shared_build_cache = stop_grace, shared_build_cache
        self.poll_s, self.recheck_s = poll_s, recheck_s
        self.report = Report()
        self.pending: list[Job] = []
        for job in jobs:
            (self.report.outcomes[Outcome.SKIPPED] if job.done() else self.pending).append(job)
        self.skipped = list(self.report.outcomes[Outcome.SKIPPED])
        self.running: dict[int, _Running] = {}  # worker slot -> its job
        self.free_slots = list(range(workers))[::-1]
        self.waiting: dict[str, tuple[Job, float]] = {}  # held jobs -> when to look again
        self.stopping = False

    def run(self) -> Report:
        with STOP.handling():  # a no-op where an entry point installed it, or off the main thread
            try:
                self._loop()
                if STOP.signal is not None:
                    self._stop()
            except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
                self.log.warning("second Ctrl-C: killing the running jobs")
                self.stopping = True
                self._signal_all(signal.SIGKILL)
                self._reap(block=True)
                raise
            finally:
                self.report.outcomes[Outcome.NOT_STARTED] += self.pending + [j for j, _ in self.waiting.values()]
                self.pending, self.waiting = [], {}
            self.report.stop_signal = STOP.signal  # read before the block restores the handlers
        return self.report

    def _loop(self) -> None:
        while (self.pending or self.running or self.waiting) and STOP.signal is None:
            while self.free_slots and STOP.signal is None:
                job = self._next_job()
                if job is None:
                    break
                self._start(self.free_slots.pop(), job)
            time.sleep(self.poll_s)
            self._reap(block=False)

    def _stop(self) -> None:
        self.log.info(
            f"{STOP.name}: stopping {len(self.running)} running job(s) (they checkpoint; up to {self.stop_grace:.0f} s)"
        )
        self.stopping = True
        self._signal_all(signal.SIGTERM)  # the engine checkpoints on SIGTERM and exits 124
        deadline = time.monotonic() + self.stop_grace
        while self.running and time.monotonic() < deadline:
            time.sleep(self.poll_s)
            self._reap(block=False)
        if self.running:
            self.log.warning(f"{len(self.running)} job(s) still running after {self.stop_grace:.0f} s: killing them")
            self._signal_all(signal.SIGKILL)
            self._reap(block=True)

    def _wait_for(self, job: Job, holder: dict) -> None:
        if job.name not in self.waiting:
            self.log.info(f"{job.name}: held by {describe(holder)}; waiting for it")
        self.waiting[job.name] = (job, time.monotonic() + self.recheck_s)

    def _next_job(self) -> Job | None:
        now = time.monotonic()
        for job, _ in [w for w in self.waiting.values() if w[1] <= now]:  # held jobs whose holder may be gone
            holder = job.holder()
            if holder is not None:
                self._wait_for(job, holder)
                continue
            del self.waiting[job.name]
            if job.done():
                self.report.outcomes[Outcome.SKIPPED].append(job)
            else:
                self.pending.insert(0, job)
        while self.pending:
            job = self.pending.pop(0)
            holder = job.holder() if job.holder is not None else None
            if holder is None:
                return job
            self._wait_for(job, holder)
        return None

    def _start(self, slot: int, job: Job) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(job.log, "a")
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.name} worker {slot}\n")
        fh.flush()
        # a session (process group) of its own: a stop reaches the job and its children, and the terminal's
        # Ctrl-C reaches only us, who stop the jobs in order
        proc = subprocess.Popen(
            list(job.argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=job_env(self.scratch, slot, self.threads, shared_build_cache=self.shared_build_cache),
            cwd=str(job.cwd),
            start_new_session=True,
        )
        self.running[slot] = _Running(job, proc, fh, time.monotonic())
        self.log.info(f"{job.name}: started on worker {slot} (pid {proc.pid}, log {job.log})")

    def _reap(self, block: bool) -> None:
        for slot, r in list(self.running.items()):
            if block:
                r.proc.wait()
            if r.proc.poll() is None:
                continue
            r.log.close()
            del self.running[slot]
            self.free_slots.append(slot)
            self.report.seconds[r.job.name] = seconds = time.monotonic() - r.started
            outcome = classify(r.job, r.proc.returncode, self.stopping)
            if outcome is Outcome.BUSY:
                self._wait_for(r.job, r.job.holder() or {})
                continue
            self.report.outcomes[outcome].append(r.job)
            self._log_outcome(r.job, outcome, r.proc.returncode, seconds)

    def _log_outcome(self, job: Job, outcome: Outcome, rc: int, seconds: float) -> None:
        if outcome is Outcome.DONE:
            self.log.info(f"{job.name}: done in {seconds:.0f} s")
        elif outcome is Outcome.STOPPED:
            self.log.info(f"{job.name}: stopped with a checkpoint (resumes on rerun)")
        elif outcome is Outcome.KILLED:
            self.log.warning(f"{job.name}: killed ({signal.Signals(-rc).name}) before it checkpointed")
        else:
            self.log.warning(f"{job.name}: FAILED (exit {rc}), log {job.log}")

    def _signal_all(self, sig: int) -> None:
        for r in self.running.values():
            if r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, sig)
                except ProcessLookupError:
                    pass
