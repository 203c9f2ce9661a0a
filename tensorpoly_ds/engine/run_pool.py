"""Several pretraining runs on one machine: each is `tensorpoly-ds pretrain` in its own process (DeepSpeed,
one rank), `workers` at a time, through the subprocess scheduler (engine.scheduler). Used by the replication's
pretraining stage and by `tensorpoly-ds lr-search`.

A run is any object with `name`, `run_dir`, `config` (the run config as a dict, written to RUN_DIR/run.yaml)
and `done()`. A run directory that already holds a different run config is refused, before any run starts:
results of two configs are never mixed. Runs resume (`--resume auto`): a stop request (Ctrl-C, SIGTERM,
SIGUSR1) makes every running run checkpoint and exit 124, `run_pretraining` raises JobsStopped (exit 130 after
Ctrl-C, else 124), and the same call again continues each run from its checkpoint. A run directory locked by
another live `pretrain` is waited for, as a sweep waits for a held row.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import yaml

from tpds_common.errors import ConfigError
from tpds_common.locking import holder_if_locked
from tpds_common.log import get_logger

from .scheduler import Job, Scheduler, raise_unless_done

log = get_logger("pretrain")


class Run(Protocol):
    name: str
    run_dir: Path
    config: dict

    def done(self) -> bool: ...


def _write_config(run: Run) -> Path:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run.run_dir / "run.yaml"
    existing = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    if existing is not None and existing != run.config:
        raise ConfigError(
            f"{cfg_path} holds a different run config than this one; use another output "
            "directory (or delete the run directory) instead of mixing configs"
        )
    cfg_path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    return cfg_path


def ensure_engine_ops() -> None:
    """Create this process's (one-rank) process group: DeepSpeed builds or loads its CPU communication op
    into TORCH_EXTENSIONS_DIR once, before several runs would race to build it."""
    from .distributed import init_distributed

    init_distributed()


def default_command() -> list[str]:
    return [sys.executable, "-m", "launch.pretrain"]


def run_pretraining(
    runs: Sequence[Run],
    scratch: Path,
    workers: int,
    threads: int,
    command: Sequence[str] | None = None,
    stop_grace: float = 120.0,
) -> dict[str, float]:
    """Train every unfinished run, `workers` at a time with `threads` threads each; `command` is the launcher
    prefix (default: this Python, `-m launch.pretrain`). Returns wall seconds per run trained now; raises
    JobsStopped after a stop request (runs checkpointed; rerun to resume) and JobFailed naming the runs that
    failed (their RUN_DIR/log.txt says why)."""
    command = list(command or default_command())
    jobs = [
        Job(
            name=run.name,
            argv=[*command, "--config", str(run.run_dir / "run.yaml"), "--resume", "auto"],
            log=run.run_dir / "log.txt",
            done=run.done,
            holder=lambda d=run.run_dir: holder_if_locked(d),
            key=run,
        )
        for run in runs
    ]
    # every run uses the op built here from the same cache instead of building its own per slot (a minute each)
    scheduler = Scheduler(
        jobs, workers=workers, threads=threads, scratch=scratch, log=log, stop_grace=stop_grace, shared_build_cache=True
    )
    log.info(f"{len(runs)} runs: {len(scheduler.skipped)} done, {len(scheduler.pending)} to train, {workers} at a time")
    for job in scheduler.pending:
        _write_config(job.key)  # all refusals before any run starts
    if scheduler.pending:
        ensure_engine_ops()
    report = scheduler.run()
    raise_unless_done(report, "pretraining")
    return report.seconds
