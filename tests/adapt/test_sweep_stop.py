"""The sweep owns its jobs: kill -9 of the sweep leaves no job running, a second sweep on the same folder is
refused, a row held by another live process is waited for (never run twice), SIGTERM stops with 124."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.manifest import read_manifest
from tensorpoly_ds.adapt.job import RESULT_FILE, is_complete
from tensorpoly_ds.adapt.table import read_table
from tests.adapt.conftest import ROOT
from tests.lock_holder import held
from tests.processes import alive
from tpds_common.locking import holder_if_locked

pytestmark = pytest.mark.slow

FAST = dict(batch_size=4, eval_batch_size=4, max_eval_examples=4, warmup_ratio=0.0, trainer="local")


def env():
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )


def write_grid(prepared, poly_export, path, **base):
    path.write_text(
        json.dumps(
            {
                "base": {"data_dir": str(prepared), **FAST, **base},
                "methods": [{"label": "Poly", "export": str(poly_export)}],
                "modes": ["z", "mu"],
                "tasks": read_manifest(prepared).held_out[:1],
                "seeds": [0],
            }
        )
    )
    return path


def sweep(grid, out, *extra, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "launch.sweep", "--grid", str(grid), "--out", str(out), "--workers", "2", *extra],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_until(predicate, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill9_of_the_sweep_leaves_no_job_running_and_a_second_sweep_is_refused(prepared, poly_export, tmp_path):
    grid = write_grid(prepared, poly_export, tmp_path / "grid.json", steps=100000, eval_every=5)
    out = tmp_path / "sw"
    first = sweep(grid, out)
    rows = wait_until(lambda: (out / "jobs.jsonl").exists() and read_table(out / "jobs.jsonl"), 60, "the table", first)
    dirs = [Path(r["job"]["out_dir"]) for r in rows]
    wait_until(lambda: all((d / "progress.json").exists() for d in dirs), 300, "both jobs training", first)
    workers = [holder_if_locked(d)["pid"] for d in dirs]
    assert all(alive(pid) for pid in workers)

    second = sweep(grid, out)  # a concurrent sweep on the same folder
    _, err = second.communicate(timeout=120)
    assert second.returncode == 75 and f"in use by pid {first.pid}" in err, err

    first.kill()  # kill -9: no chance to stop its jobs itself
    first.wait()
    wait_until(lambda: not any(alive(pid) for pid in workers), 120, "the jobs to stop after the sweep died")
    for d in dirs:  # they stopped the orderly way: a checkpoint and a requeue state each
        result = json.loads((d / RESULT_FILE).read_text())
        assert result["status"] == "requeue" and result["signal"] == "SIGTERM", result
        assert (d / "local_checkpoint.pt").is_file() and not is_complete(d)
        assert holder_if_locked(d) is None


def test_a_row_held_by_another_process_is_waited_for_and_sigterm_stops_the_sweep(prepared, poly_export, tmp_path):
    grid = write_grid(prepared, poly_export, tmp_path / "grid.json", steps=3, eval_every=0)
    out = tmp_path / "sw"
    assert (
        subprocess.run(
            [sys.executable, "-m", "launch.sweep", "--grid", str(grid), "--out", str(out), "--expand-only"],
            cwd=ROOT,
            env=env(),
            timeout=120,
        ).returncode
        == 0
    )
    rows = read_table(out / "jobs.jsonl")
    held_dir = Path(rows[1]["job"]["out_dir"])
    with held(held_dir, "adaptation job") as holder:
        proc = sweep(grid, out)
        wait_until(lambda: is_complete(rows[0]["job"]["out_dir"]), 300, "row 0", proc)
        time.sleep(1.0)
        assert proc.poll() is None and not (held_dir / RESULT_FILE).exists()  # row 1 never started
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 124, stdout + stderr
        assert f"row 1 {rows[1]['id']}: held by pid {holder.pid}" in stderr and "waiting for it" in stderr
        assert "rows remaining [1]" in stderr and "not started: [1]" in stderr
    proc = sweep(grid, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert "1 complete, 1 to run" in stderr and all(is_complete(r["job"]["out_dir"]) for r in rows)
