"""A stand-in for `tensorpoly-ds <stage>` in the Slurm tests: `python stand_in.py STAGE [args...]`.

Every run appends one JSON line (stage, args, the Slurm/launcher variables, start and end times) to
$TPDS_TEST_RECORD/<stage>.jsonl. Stage behaviour:
  sweep     writes <--out>/jobs.jsonl with $TPDS_TEST_ROWS (default 3) rows, as `tensorpoly-ds sweep --expand-only`
  pretrain  with TPDS_TEST_USR1=1 on the first run (SLURM_RESTART_COUNT unset/0): write "ready", wait for
  (adapt)   SIGUSR1 (at most 60 s), then record it and exit 124 ("checkpointed, requeue me"); with
            TPDS_TEST_USR1=early: write "ready" and sleep without a handler (killed by SIGUSR1); with
            TPDS_TEST_USR1=always124: exit 124 at once, every run; otherwise exit 0
  other     record and exit 0; TPDS_TEST_FAIL=<stage> makes that stage exit 3
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

VARS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_JOB_NODELIST",
    "SLURMD_NODENAME",
    "SLURM_RESTART_COUNT",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCH_EXTENSIONS_DIR",
    "OMP_NUM_THREADS",
    "TPDS_TEST_FROM_ENV_FILE",
)


def ext_files() -> list[str] | None:
    """Files in TORCH_EXTENSIONS_DIR (relative), None if it does not exist."""
    d = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not d or not os.path.isdir(d):
        return None
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())


def record(stage: str, **fields) -> None:
    out = Path(os.environ["TPDS_TEST_RECORD"]) / f"{stage}.jsonl"
    line = json.dumps(
        {"stage": stage, "pid": os.getpid(), **{v: os.environ.get(v) for v in VARS}, "ext_files": ext_files(), **fields}
    )
    with open(out, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")


def arg_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def main() -> int:
    stage, args = sys.argv[1], sys.argv[2:]
    start = time.time()
    if os.environ.get("TPDS_TEST_FAIL") == stage:
        record(stage, args=args, start=start, end=time.time(), event="fail")
        return 3
    if stage == "sweep":
        out = Path(arg_after(args, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        rows = int(os.environ.get("TPDS_TEST_ROWS", "3"))
        with open(out / "jobs.jsonl", "w") as f:
            for i in range(rows):
                f.write(
                    json.dumps({"row": i, "id": f"row{i}", "job": {"out_dir": str(out / "jobs" / f"row{i}")}}) + "\n"
                )
    first_run = os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0")
    requeueable = stage in ("pretrain", "adapt")
    if requeueable and os.environ.get("TPDS_TEST_USR1") == "early" and first_run:
        # a trainer still starting up: no handler yet, so SIGUSR1's default action kills it
        record(stage, args=args, start=start, event="ready")
        time.sleep(60)
        return 1
    if requeueable and os.environ.get("TPDS_TEST_USR1") == "always124":
        record(stage, args=args, start=start, end=time.time(), event="124")
        return 124
    if requeueable and os.environ.get("TPDS_TEST_USR1") == "1" and first_run:
        got = []
        signal.signal(signal.SIGUSR1, lambda *_: got.append(time.time()))
        record(stage, args=args, start=start, event="ready")
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.1)
        if got:
            record(stage, args=args, start=start, end=time.time(), event="usr1")
            return 124
        record(stage, args=args, start=start, end=time.time(), event="no-usr1")
        return 1
    time.sleep(float(os.environ.get("TPDS_TEST_SLEEP", "0")))
    record(stage, args=args, start=start, end=time.time(), event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
