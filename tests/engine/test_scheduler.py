"""The subprocess scheduler (tensorpoly_ds.engine.scheduler) with tiny stand-in jobs (`python -c`, no torch):
each outcome, slots, stop with grace then kill, a second Ctrl-C, jobs held by another process; and the
pretraining pool's stop and resume on top of it (engine.run_pool).

The stand-ins request stops themselves (a signal to their parent, this test process), once what the test needs
is running, so nothing depends on timing; durations are never asserted, timeouts are deadlines only. While a
test runs, the stop signals have a recording handler, so a scheduler that failed to install its own (and so
never stopped) fails the test instead of killing pytest.

Mutations tried (each failed the test named):
- classify(): the exit status read before `done()` (a job that wrote its marker, then exited 5, is failed), or
  EXIT_REQUEUE not classified stopped, or EXIT_BUSY without a probe treated as busy (TypeError calling the
  missing probe); a done job not skipped at the start (it runs again): test_each_exit_is_classified_once.
- _reap(): the slot not returned to free_slots (the pool stalls; the watchdog's stop ends it, outcomes differ),
  or returned twice (two jobs on one slot): test_never_more_than_workers_at_once.
- _stop(): SIGKILL instead of SIGTERM first (the checkpointing job is killed, not stopped); os.kill of the job's
  pid instead of os.killpg of its group (the grandchild survives): test_stop_sends_sigterm_then_kills_after_the_grace.
- run(): a KeyboardInterrupt handled like a first stop (SIGTERM and the grace) instead of SIGKILL at once (the
  job is still running when it propagates): test_a_second_ctrl_c_kills_at_once.
- _next_job(): the holder probe ignored (the held job runs while the holder lives: exit 4, failed):
  test_a_held_job_waits_for_its_holder; EXIT_BUSY with a probe classified failed instead of waited for:
  test_a_job_that_finds_itself_busy_is_run_again.
- Scheduler.run without STOP.handling() (the stop request is never seen: both stand-ins time out, JobFailed
  instead of JobsStopped), or raise_unless_done ignoring a stop (no JobsStopped):
  test_pretraining_pool_stops_with_checkpoints_and_the_rerun_resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tensorpoly_ds.engine import run_pool
from tensorpoly_ds.engine.scheduler import FINAL, Job, JobsStopped, Outcome, Scheduler
from tests.lock_holder import held
from tests.processes import alive
from tpds_common.errors import EXIT_INTERRUPTED, EXIT_REQUEUE, ConfigError, JobFailed
from tpds_common.locking import holder_if_locked

DEADLINE_S = 60  # a stand-in that is never stopped gives up after this (exit 3): a failure, not a hang

STAND_IN = r"""
import json, os, signal, subprocess, sys, time
if "--config" in sys.argv:  # a pretraining run: RUN_DIR/run.yaml, the spec from the environment
    d = os.path.dirname(sys.argv[sys.argv.index("--config") + 1])
    spec = dict(json.loads(os.environ["STAND_IN_SPEC"]), name=d, dir=d)
else:
    spec = json.loads(sys.argv[1])
d = spec["dir"]
os.makedirs(d, exist_ok=True)
def mark(name, text=""):
    with open(os.path.join(d, name), "a") as f:
        f.write(text)
def record(event):
    if spec.get("record"):
        slot = os.path.basename(os.environ.get("TORCH_EXTENSIONS_DIR", ""))
        with open(spec["record"], "a") as f:
            f.write(json.dumps({"job": spec["name"], "event": event, "slot": slot, "t": time.monotonic()}) + "\n")
def wait_for(paths):
    end = time.monotonic() + @DEADLINE@
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > end:
            sys.exit(3)
        time.sleep(0.02)
def requeue(signum, frame):
    mark("checkpoint")
    sys.exit(124)
mark("runs", "x")
mark("argv", json.dumps(sys.argv[1:]))
record("start")
if spec.get("assert_dead"):  # the holder must be gone (or a zombie) before this job runs
    try:
        with open(f"/proc/{spec['assert_dead']}/stat") as f:
            if f.read().split(") ")[1][0] != "Z":
                sys.exit(4)
    except OSError:
        pass
if spec.get("kill_pid"):
    os.kill(spec["kill_pid"], signal.SIGKILL)
if spec.get("busy_once") and not os.path.exists(os.path.join(d, "tried")):
    mark("tried")
    sys.exit(75)
if spec.get("resume") and os.path.exists(os.path.join(d, "checkpoint")):
    mark("resumed")
    spec["on_term"] = None
    spec["forever"] = False
if spec.get("on_term") == "requeue":
    signal.signal(signal.SIGTERM, requeue)
elif spec.get("on_term") == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if spec.get("child"):
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(@DEADLINE@)"])
    mark("child", str(child.pid))
mark("started")
if spec.get("wait_for"):
    wait_for(spec["wait_for"])
if spec.get("stop_parent"):
    parent, end = os.getppid(), time.monotonic() + @DEADLINE@
    os.kill(parent, spec["stop_parent"])
    # until we are killed, a second request that cannot come too soon; never to a new parent (orphaned)
    while spec.get("again_every") and time.monotonic() < end:
        time.sleep(spec["again_every"])
        if os.getppid() != parent:
            sys.exit(3)
        os.kill(parent, spec["stop_parent"])
if spec.get("forever"):
    time.sleep(@DEADLINE@)
    sys.exit(3)
time.sleep(spec.get("sleep", 0))
record("end")
if spec.get("done"):
    mark("done")
sys.exit(spec.get("exit", 0))
""".replace("@DEADLINE@", str(DEADLINE_S))

log = logging.getLogger("test-scheduler")


def job(tmp: Path, name: str, holder_dir: Path | None = None, **spec) -> Job:
    d = tmp / name
    return Job(
        name=name,
        argv=[sys.executable, "-c", STAND_IN, json.dumps({"name": name, "dir": str(d), **spec})],
        log=d / "log.txt",
        done=lambda: (d / "done").exists(),
        holder=(lambda: holder_if_locked(holder_dir)) if holder_dir is not None else None,
        key=name,
    )


def run(jobs, workers=2, **kw):
    return Scheduler(jobs, workers=workers, threads=1, scratch=jobs[0].log.parents[1], log=log, **kw).run()


@pytest.fixture(autouse=True)
def _watchdog():
    """A scheduler that never ends (a slot never freed) is stopped after DEADLINE_S: the test fails, not hangs."""
    timer = threading.Timer(DEADLINE_S, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    timer.start()
    yield
    timer.cancel()


def outcomes(report) -> dict[str, list[str]]:
    return {o.value: sorted(report.names(o)) for o in FINAL if report.outcomes[o]}


@pytest.fixture(autouse=True)
def _stop_signals_recorded():
    """Stop signals that reach this process while no scheduler handles them are recorded, not fatal."""
    seen = []
    previous = {s: signal.signal(s, lambda n, f: seen.append(n)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield seen
    for s, h in previous.items():
        signal.signal(s, h)


def test_each_exit_is_classified_once(tmp_path):
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "done").write_text("")
    jobs = [
        job(tmp_path, "finished", done=True),  # done before: skipped, never started
        job(tmp_path, "ok", done=True),
        job(tmp_path, "crash", exit=3),
        job(tmp_path, "no_marker", exit=0),  # exit 0 without done(): failed
        job(tmp_path, "marker_then_5", done=True, exit=5),  # done() is final whatever the exit
        job(tmp_path, "requeue", exit=EXIT_REQUEUE),  # stopped on its own (a time budget)
        job(tmp_path, "busy_no_probe", exit=75),  # nothing to wait for: failed
    ]
    report = run(jobs, workers=3)
    assert outcomes(report) == {
        "skipped": ["finished"],
        "done": ["marker_then_5", "ok"],
        "failed": ["busy_no_probe", "crash", "no_marker"],
        "stopped": ["requeue"],
    }
    assert not (tmp_path / "finished" / "runs").exists()
    assert report.stop_signal is None and set(report.seconds) == {j.name for j in jobs[1:]}
    for j in jobs[1:]:
        assert (j.log.parent / "runs").read_text() == "x"  # started exactly once
        assert j.log.read_text().startswith("=== ") and f" {j.name} worker " in j.log.read_text()


def test_never_more_than_workers_at_once(tmp_path):
    record = tmp_path / "record.jsonl"
    # j0 waits until j1 runs too: with two workers they overlap for sure, so the bound is met, not just kept
    first = job(tmp_path, "j0", done=True, sleep=0.3, record=str(record), wait_for=[str(tmp_path / "j1" / "started")])
    rest = [job(tmp_path, f"j{i}", done=True, sleep=0.3, record=str(record)) for i in range(1, 5)]
    report = run([first, *rest], workers=2)
    assert outcomes(report) == {"done": [f"j{i}" for i in range(5)]}
    events = sorted((json.loads(line) for line in record.read_text().splitlines()), key=lambda e: e["t"])
    running, peak = {}, 0
    for e in events:
        if e["event"] == "start":
            assert e["slot"] not in running.values(), f"slot {e['slot']} given to two running jobs: {events}"
            running[e["job"]] = e["slot"]
            peak = max(peak, len(running))
        else:
            del running[e["job"]]
    assert peak <= 2 and {e["slot"] for e in events} <= {"worker0", "worker1"}, events
    assert peak == 2


def test_stop_sends_sigterm_then_kills_after_the_grace(tmp_path):
    """Two running jobs: one checkpoints on SIGTERM (stopped), one ignores it and has a child that ignores it
    too (both killed after the grace: the whole process group). A third never starts; a fourth is held by
    another process when the stop comes (not started)."""
    stubborn = tmp_path / "stubborn"
    held_dir = tmp_path / "held_folder"
    held_dir.mkdir()
    with held(held_dir):
        jobs = [
            job(tmp_path, "held", holder_dir=held_dir, done=True),
            job(tmp_path, "stubborn", on_term="ignore", child=True, forever=True),
            job(
                tmp_path,
                "polite",
                on_term="requeue",
                forever=True,
                wait_for=[str(stubborn / "started")],
                stop_parent=signal.SIGTERM,
            ),
            job(tmp_path, "later", done=True),
        ]
        report = run(jobs, workers=2, stop_grace=2.0)  # ample for "polite" to exit, short for the test
    assert report.stop_signal == signal.SIGTERM and report.stop_name == "SIGTERM"
    assert outcomes(report) == {"stopped": ["polite"], "killed": ["stubborn"], "not_started": ["held", "later"]}
    assert (tmp_path / "polite" / "checkpoint").exists()
    grandchild = int((stubborn / "child").read_text())
    deadline = time.monotonic() + 30
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_a_second_ctrl_c_kills_at_once(tmp_path):
    """The first SIGINT asks the job to checkpoint (it ignores SIGTERM; the grace is long); a second one a
    moment later (stop.ABORT_AFTER_S) kills it without waiting and raises KeyboardInterrupt."""
    j = job(tmp_path, "stubborn", on_term="ignore", forever=True, stop_parent=signal.SIGINT, again_every=1.5)
    scheduler = Scheduler([j], workers=1, threads=1, scratch=tmp_path, log=log, stop_grace=DEADLINE_S)
    with pytest.raises(KeyboardInterrupt):
        scheduler.run()
    assert not scheduler.running and scheduler.report.names(Outcome.KILLED) == ["stubborn"]


def test_a_held_job_waits_for_its_holder(tmp_path):
    """Job A's folder is held by another live process; B runs meanwhile and ends the holder; A then runs
    once, and only after the holder died (its stand-in checks)."""
    held_dir = tmp_path / "a_folder"
    held_dir.mkdir()
    with held(held_dir) as holder:
        a = job(tmp_path, "a", holder_dir=held_dir, done=True, assert_dead=holder.pid)
        b = job(tmp_path, "b", done=True, kill_pid=holder.pid, sleep=0.2)
        report = run([a, b], workers=2, recheck_s=0.1)
    assert outcomes(report) == {"done": ["a", "b"]}
    assert (tmp_path / "a" / "runs").read_text() == "x"


def test_a_job_that_finds_itself_busy_is_run_again(tmp_path):
    """EXIT_BUSY (another process took the folder between the probe and the start) is waited for, then rerun."""
    free = tmp_path / "free_folder"
    free.mkdir()
    report = run([job(tmp_path, "racy", holder_dir=free, busy_once=True, done=True)], workers=1, recheck_s=0.1)
    assert outcomes(report) == {"done": ["racy"]}
    assert (tmp_path / "racy" / "runs").read_text() == "xx"


class _Run:
    def __init__(self, root: Path, name: str):
        self.name, self.run_dir, self.config = name, root / name, {"run": {"dir": str(root / name)}}

    def done(self) -> bool:
        return (self.run_dir / "done").exists()


def test_pretraining_pool_stops_with_checkpoints_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A stop request during a pool: the running run checkpoints, the pool raises JobsStopped (exit 124) naming
    it and the run that never started; the same call again resumes the stopped one and trains the other."""
    monkeypatch.setattr(run_pool, "ensure_engine_ops", lambda: None)  # no process group in the test process
    runs = [_Run(tmp_path, "first"), _Run(tmp_path, "second")]

    command = [sys.executable, "-c", STAND_IN]
    spec = dict(done=True, resume=True)
    monkeypatch.setenv("STAND_IN_SPEC", json.dumps(dict(spec, on_term="requeue", forever=True, stop_parent=15)))
    with pytest.raises(JobsStopped) as stopped:
        run_pool.run_pretraining(runs, tmp_path, workers=1, threads=1, command=command, stop_grace=30)
    assert stopped.value.exit_code == EXIT_REQUEUE
    assert "stopped by SIGTERM: checkpointed ['first']" in str(stopped.value) and "not started ['second']" in str(
        stopped.value
    )
    assert (tmp_path / "first" / "checkpoint").exists() and not (tmp_path / "second" / "runs").exists()
    assert (tmp_path / "second" / "run.yaml").is_file()  # every config written (and checked) before any run

    monkeypatch.setenv("STAND_IN_SPEC", json.dumps(spec))
    seconds = run_pool.run_pretraining(runs, tmp_path, workers=2, threads=1, command=command)
    assert set(seconds) == {"first", "second"} and all(r.done() for r in runs)
    assert (tmp_path / "first" / "resumed").exists() and not (tmp_path / "second" / "resumed").exists()
    argv = json.loads((tmp_path / "second" / "argv").read_text())
    assert argv == ["--config", str(tmp_path / "second" / "run.yaml"), "--resume", "auto"]


def test_pretraining_pool_names_failed_runs_and_refuses_a_changed_config(tmp_path, monkeypatch):
    monkeypatch.setattr(run_pool, "ensure_engine_ops", lambda: None)
    runs = [_Run(tmp_path, "bad")]
    with pytest.raises(JobFailed, match=r"pretraining failed for \['bad'\]"):
        run_pool.run_pretraining(runs, tmp_path, 1, 1, command=[sys.executable, "-c", "import sys; sys.exit(1)"])
    runs[0].config["extra"] = 1
    with pytest.raises(ConfigError, match="holds a different run config"):
        run_pool.run_pretraining(runs, tmp_path, 1, 1, command=[sys.executable, "-c", "pass"])


def test_jobs_stopped_exit_codes():
    assert JobsStopped("x", signal.SIGINT).exit_code == EXIT_INTERRUPTED
    assert JobsStopped("x", signal.SIGTERM).exit_code == EXIT_REQUEUE == JobsStopped("x", None).exit_code
