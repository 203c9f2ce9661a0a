"""Several pretraining runs on one machine: each is `tensorpoly-ds pretrain` in its own process (DeepSpeed,
one rank), `workers` at a time. Used by the replication's pretraining stage and by `tensorpoly-ds lr-search`.

A run is any object with `name`, `run_dir`, `config` (the run config as a dict, written to RUN_DIR/run.yaml)
and `done()`. A run directory that already holds a different run config is refused: results of two configs
are never mixed. Runs resume (`--resume auto`), so a rerun after a stop continues from the last checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import yaml

from tpds_common.errors import ConfigError, JobFailed
from tpds_common.log import get_logger

from .job_env import REPO_ROOT, job_env

log = get_logger("pretrain")


class Run(Protocol):
    name: str
    run_dir: Path
    config: dict

    def done(self) -> bool: ...


def _launch(
    run: Run, slot: int, threads: int, scratch: Path, command: Sequence[str]
) -> tuple[subprocess.Popen, object]:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run.run_dir / "run.yaml"
    existing = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    if existing is not None and existing != run.config:
        raise ConfigError(
            f"{cfg_path} holds a different run config than this one; use another output "
            "directory (or delete the run directory) instead of mixing configs"
        )
    cfg_path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    fh = open(run.run_dir / "log.txt", "a")
    cmd = [*command, "--config", str(cfg_path), "--resume", "auto"]
    env = job_env(scratch, slot, threads)
    # the caller built DeepSpeed's CPU op before (ensure_engine_ops): every run loads it from the same cache
    # instead of building its own copy per worker slot (a minute each)
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    else:
        env.pop("TORCH_EXTENSIONS_DIR", None)
    proc = subprocess.Popen(
        cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT), env=env, start_new_session=True
    )
    return proc, fh


def ensure_engine_ops() -> None:
    """Create this process's (one-rank) process group: DeepSpeed builds or loads its CPU communication op
    into TORCH_EXTENSIONS_DIR once, before several runs would race to build it."""
    from .distributed import init_distributed

    init_distributed()


def default_command() -> list[str]:
    return [sys.executable, "-m", "launch.pretrain"]


def run_pretraining(
    runs: Sequence[Run], scratch: Path, workers: int, threads: int, command: Sequence[str] | None = None
) -> dict[str, float]:
    """Train every unfinished run, `workers` at a time with `threads` threads each; `command` is the launcher
    prefix (default: this Python, `-m launch.pretrain`). Returns wall seconds per run trained now; raises
    naming the runs that failed (their RUN_DIR/log.txt says why)."""
    command = list(command or default_command())
    pending = [r for r in runs if not r.done()]
    if pending:
        ensure_engine_ops()
    log.info(f"{len(runs)} runs: {len(runs) - len(pending)} done, {len(pending)} to train, {workers} at a time")
    running: dict[int, tuple[Run, subprocess.Popen, object, float]] = {}
    free = list(range(workers))[::-1]
    seconds: dict[str, float] = {}
    failed = []
    try:
        while pending or running:
            while pending and free:
                slot, run = free.pop(), pending.pop(0)
                proc, fh = _launch(run, slot, threads, scratch, command)
                running[slot] = (run, proc, fh, time.monotonic())
                log.info(f"{run.name}: started (log {run.run_dir / 'log.txt'})")
            time.sleep(0.5)
            for slot, (run, proc, fh, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del running[slot]
                free.append(slot)
                seconds[run.name] = time.monotonic() - t0
                if proc.returncode == 0 and run.done():
                    log.info(f"{run.name}: done in {time.monotonic() - t0:.0f} s")
                else:
                    failed.append(run)
                    log.warning(f"{run.name}: FAILED (exit {proc.returncode}), see {run.run_dir / 'log.txt'}")
    except KeyboardInterrupt:
        _stop(p for _, p, _, _ in running.values())
        raise
    if failed:
        raise JobFailed(f"pretraining failed for {[r.name for r in failed]}")
    return seconds


def _stop(procs) -> None:
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # the engine checkpoints on SIGTERM: the rerun resumes
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
