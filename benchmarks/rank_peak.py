"""Run a Python script as this process and record its peak memory when it ends.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/rank_peak.py OUT_DIR launch/pretrain.py ARGS...

Each rank runs SCRIPT with ARGS (as `python SCRIPT ARGS` would) and, however it ends, writes
OUT_DIR/rank<RANK>.json: the peak resident set size of the process (getrusage: exact, not sampled), the
peak CUDA memory allocated if a GPU was used, the wall time and the exit status.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path


def peak_record(exit_code: int, seconds: float) -> dict:
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "exit_code": exit_code,
        "wall_s": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # Linux: KiB
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        record["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return record


def main() -> None:
    out_dir, script, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    out_dir.mkdir(parents=True, exist_ok=True)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    start, code = time.monotonic(), 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        code = 1
        raise
    finally:
        record = peak_record(code, time.monotonic() - start)
        path = out_dir / f"rank{record['rank']}.json"
        path.write_text(json.dumps(record, indent=2))
    sys.exit(code)


if __name__ == "__main__":
    main()
