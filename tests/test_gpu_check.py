"""The GPU check (benchmarks/gpu/gpu_check.py) in its CPU mode: every measurement and both pretrain runs on
tiny shapes, so the script a GPU session runs once is known to work before that session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu" / "gpu_check.py"),
            "--cpu-smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = {r["case"]: r for r in result["cases"]}
    assert len(cases) == 11 and "frozen floor" in cases and "ours tensorpoly_i_R8_N2, factors saved" in cases
    for name, row in cases.items():
        if name.startswith("peft") and row["status"].startswith("skipped: peft not installed"):
            continue
        assert row["status"] == "ok" and row["step_ms"] > 0, row
        assert (row["trainable_params"] == 0) == (name == "frozen floor"), row  # the floor trains nothing
    runs = {r["case"]: r for r in result["pretrain"]}
    assert set(runs) == {"zero0_bf16_autocast", "zero3_bf16"}
    for row in runs.values():
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["export_tensors"] > 0, row
        assert row["checkpoint_mb"] < 5 and row["peak"]["exit_code"] == 0
    assert runs["zero3_bf16"]["backbone_partitioned"] is True
    adaptation = {r["case"]: r for r in result["adaptation"]}
    assert set(adaptation) == {"adapt anli_r1", "adapt copa", "adapt hellaswag"}
    for row in adaptation.values():
        assert row["status"] == "ok" and row["steps_per_budget"] > 0, row
        assert set(row["step_ms"]) == {"0", "1024", "4096"} and min(row["step_ms"].values()) > 0, row
    assert "frozen floor" in proc.stdout and "zero3_bf16" in proc.stdout  # the tables
    assert "adapt hellaswag" in proc.stdout
