"""Sweep grid -> job table expansion, `adapt --job-table --row`, local runs with P workers, interrupt + rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.manifest import read_manifest
from launch import adapt as adapt_cli
from launch import sweep as sweep_cli
from launch.cli import main as cli_main
from tensorpoly_ds.adapt.job import JobError, is_complete
from tensorpoly_ds.adapt.table import TableError, expand_grid, read_table
from tests.adapt.conftest import ROOT

# the local trainer: this file tests the sweep machinery; the engine path has its own test
FAST = dict(
    steps=2, batch_size=4, eval_every=0, eval_batch_size=8, max_eval_examples=8, warmup_ratio=0.0, trainer="local"
)


def grid(prepared, poly_export, **base):
    return {
        "base": {"data_dir": str(prepared), **FAST, **base},
        "methods": [
            {"label": "Poly", "export": str(poly_export)},
            {"label": "LoRA", "method": "lora"},
            {"label": "FullFT", "method": "fullft"},
        ],
        "modes": ["full", "z", "mu"],
        "tasks": "held_out",
        "seeds": [0, 1024, 42],
    }


def test_grid_expansion_order_and_ids(prepared, poly_export, tmp_path):
    tasks = read_manifest(prepared).held_out
    rows = expand_grid(grid(prepared, poly_export), tmp_path)
    # Poly: 3 modes x 3 tasks x 3 seeds; LoRA and FullFT have no routing: mode full only
    assert len(rows) == 27 + 9 + 9
    assert [r["row"] for r in rows] == list(range(len(rows)))
    expected = [
        (m, mode, t, s) for m in ("Poly",) for mode in ("full", "z", "mu") for t in tasks for s in (0, 1024, 42)
    ]
    expected += [(m, "full", t, s) for m in ("LoRA", "FullFT") for t in tasks for s in (0, 1024, 42)]
    assert [(r["job"]["label"], r["job"]["mode"], r["job"]["task"], r["job"]["seed"]) for r in rows] == expected
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["job"]["out_dir"] for r in rows}) == len(rows)
    assert rows == expand_grid(grid(prepared, poly_export), tmp_path), "expansion must be deterministic"
    with pytest.raises(TableError, match="unknown key"):
        expand_grid({**grid(prepared, poly_export), "mode": ["z"]}, tmp_path)
    with pytest.raises(JobError, match=r"unknown job field\(s\) \['stepz'\]"):
        expand_grid({**grid(prepared, poly_export), "base": {"data_dir": str(prepared), "stepz": 3}}, tmp_path)


def test_expand_only_and_adapt_row(prepared, poly_export, tmp_path, capsys):
    gfile = tmp_path / "grid.json"
    gfile.write_text(json.dumps(grid(prepared, poly_export)))
    assert sweep_cli.main(["--grid", str(gfile), "--out", str(tmp_path / "sw"), "--expand-only"]) == 0
    table = tmp_path / "sw" / "jobs.jsonl"
    rows = read_table(table)
    assert len(rows) == 45 and not (tmp_path / "sw" / "jobs").exists()
    capsys.readouterr()
    assert adapt_cli.main(["--job-table", str(table), "--row", "10", "--print-job"]) == 0
    assert json.loads(capsys.readouterr().out) == rows[10]["job"]
    assert adapt_cli.main(["--job-table", str(table), "--row", "10", "--set", "eval_batch_size=2", "--print-job"]) == 0
    assert json.loads(capsys.readouterr().out) == {**rows[10]["job"], "eval_batch_size": 2}
    assert cli_main(["adapt", "--job-table", str(table), "--row", "45"]) == 2
    os.environ["SLURM_ARRAY_TASK_ID"] = "10"
    try:
        assert adapt_cli.main(["--job-table", str(table)]) == 0  # the Slurm array way
    finally:
        del os.environ["SLURM_ARRAY_TASK_ID"]
    assert is_complete(rows[10]["job"]["out_dir"])
    assert sum(is_complete(r["job"]["out_dir"]) for r in rows) == 1


def sweep_cmd(gfile, out, *extra):
    return [sys.executable, "-m", "launch.sweep", "--grid", str(gfile), "--out", str(out), *extra]


@pytest.mark.slow
def test_local_sweep_workers_interrupt_and_rerun(prepared, poly_export, tmp_path):
    g = grid(prepared, poly_export)
    g["methods"], g["modes"], g["seeds"] = g["methods"][:1], ["z", "mu"], [0]
    g["tasks"] = read_manifest(prepared).held_out[:2]
    gfile = tmp_path / "grid.json"
    gfile.write_text(json.dumps(g))
    out = tmp_path / "sw"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )
    # 1) start with one worker, interrupt after the first job completed
    proc = subprocess.Popen(
        sweep_cmd(gfile, out, "--workers", "1"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rows = None
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "jobs.jsonl").exists():
            rows = read_table(out / "jobs.jsonl")
            if any(is_complete(r["job"]["out_dir"]) for r in rows):
                break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    done_before = [r["row"] for r in rows if is_complete(r["job"]["out_dir"])]
    assert 1 <= len(done_before) < 4, output
    remaining = sorted(set(range(4)) - set(done_before))
    assert f"stopped by SIGINT: rows remaining {remaining}" in output
    # the job running at Ctrl-C stopped after its step with a checkpoint (or had not started training yet)
    stopped = [i for i in remaining if Path(rows[i]["job"]["out_dir"], "result.json").exists()]
    for i in stopped:
        assert json.loads(Path(rows[i]["job"]["out_dir"], "result.json").read_text())["status"] == "requeue"
    stamps = {i: Path(rows[i]["job"]["out_dir"], "result.json").stat().st_mtime_ns for i in done_before}
    # 2) rerun with two workers: only the unfinished rows run
    res = subprocess.run(
        sweep_cmd(gfile, out, "--workers", "2"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(done_before)} complete, {4 - len(done_before)} to run" in res.stderr  # log lines: stderr
    assert all(is_complete(r["job"]["out_dir"]) for r in rows)
    for i in done_before:
        assert Path(rows[i]["job"]["out_dir"], "result.json").stat().st_mtime_ns == stamps[i]
    for r in rows:
        assert (Path(r["job"]["out_dir"]) / "log.txt").read_text().count("=== ") >= 1
    for i in stopped:  # ... and the rerun resumed it
        assert "resuming the run stopped at" in Path(rows[i]["job"]["out_dir"], "log.txt").read_text()
    # 3) a third run has nothing to do
    res = subprocess.run(
        sweep_cmd(gfile, out, "--workers", "2"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "4 complete, 0 to run" in res.stderr
