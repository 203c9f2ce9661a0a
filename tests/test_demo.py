"""The README's demo command, shrunk: every stage runs for real and the report has every job."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_resumes(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")))
    cmd = [sys.executable, "-m", "launch.demo", "--out", str(tmp_path / "demo"), "--methods", "poly",
           "--seeds", "0", "--backbone-steps", "20", "--pretrain-steps", "10", "--adapt-steps", "4"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = tmp_path / "demo" / "report"
    rows = [r for r in csv.DictReader((report / "table1.csv").open()) if r["task"] != "avg"]
    cells = {(r["method"], r["mode"], r["task"]) for r in rows}
    assert {(m, mode) for m, mode, _ in cells} == {("Poly", "full"), ("Poly", "z"), ("Poly", "mu")}
    assert len(cells) == 9 and all(r["n"] == "1" for r in rows)
    assert "| Poly |" in first.stdout and "0 missing/failed" in first.stdout
    # a second run finds everything done
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already has an export, skipped" in again.stdout and "skipped (complete) 9" in again.stdout
