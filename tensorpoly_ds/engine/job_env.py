"""The environment of a local subprocess job (a sweep row, a pretraining run of a pool): a single process
with its own rendezvous port, thread count and DeepSpeed build cache, that stops when its parent dies."""

from __future__ import annotations

import os
from pathlib import Path

from tpds_common.net import free_port

# the source tree holding tensorpoly_ds and launch: jobs run `python -m launch.<stage>` from it
REPO_ROOT = Path(__file__).resolve().parents[2]
PARENT_PID_ENV = "TPDS_PARENT_PID"  # read by stop_with_parent (launch/adapt.py, launch/pretrain.py)


def job_env(out: Path, worker: int, threads: int, shared_build_cache: bool = False) -> dict[str, str]:
    """`shared_build_cache`: every worker uses $TORCH_EXTENSIONS_DIR itself (DeepSpeed's default when unset),
    for callers that built the op once before starting the jobs (run_pool.ensure_engine_ops)."""
    env = dict(os.environ)
    env["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    if shared_build_cache:
        if not env.get("TORCH_EXTENSIONS_DIR"):
            env.pop("TORCH_EXTENSIONS_DIR", None)
    else:
        # one build cache per worker slot (concurrent JIT builds clash on the lock), under $TORCH_EXTENSIONS_DIR
        # when set (reused across sweeps), else under the sweep directory
        base = Path(env["TORCH_EXTENSIONS_DIR"]) if env.get("TORCH_EXTENSIONS_DIR") else out / ".torch_extensions"
        env["TORCH_EXTENSIONS_DIR"] = str(base / f"worker{worker}")
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)  # a local worker is a single process; the row comes from --row
    env[PARENT_PID_ENV] = str(os.getpid())  # the worker stops (checkpoints) if its parent dies
    return env


def stop_with_parent() -> None:
    """In a job started with job_env's environment (a sweep row, a run of a pretraining pool): checkpoint and
    stop when the process that started it dies, so that kill -9 of a sweep or pool leaves no orphan training on.
    Elsewhere (the variable unset) nothing."""
    from .stop import stop_when_parent_dies

    if os.environ.get(PARENT_PID_ENV):
        stop_when_parent_dies(int(os.environ[PARENT_PID_ENV]))
