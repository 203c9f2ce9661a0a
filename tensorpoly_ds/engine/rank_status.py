"""Per-rank exit status files, so that a wrapper can tell "every rank checkpointed, requeue me" from a
crash where the launcher cannot: torchrun exits 1 whenever a worker exits non-zero, 124 included.

Each rank of `tensorpoly-ds pretrain` writes RUN_DIR/status/rank<r>.json (and the same file in
$TPDS_STATUS_DIR when a wrapper set that variable, see launch/torchrun.py): `status` "running" once its
config is checked, then "done" (exit 0), "requeue" (exit 124: a checkpoint was written) or "failed" (with
the error), plus pid, host, local rank and the world sizes. Written atomically; a new run overwrites its
rank's file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tpds_common.files import atomic_write_text

STATUS_DIR_ENV = "TPDS_STATUS_DIR"


def write_status(run_dir: str | os.PathLike, rank: int, status: str, **fields) -> None:
    body = {
        "rank": rank,
        "status": status,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        **fields,
    }
    for directory in filter(None, [Path(run_dir) / "status", os.environ.get(STATUS_DIR_ENV)]):
        atomic_write_text(Path(directory) / f"rank{rank}.json", json.dumps(body, indent=1))


def read_statuses(directory: str | os.PathLike) -> dict[int, dict]:
    out = {}
    for path in sorted(Path(directory).glob("rank*.json")):
        try:
            body = json.loads(path.read_text())
            out[int(body["rank"])] = body
        except (OSError, ValueError, KeyError):
            continue
    return out
