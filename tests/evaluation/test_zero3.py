"""ZeRO-3 on two ranks gives the same rank-classification records as one plain process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpds_common.net import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero3_eval_worker.py")


def run(args, env, timeout=600):
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_zero3_two_ranks_equal_one_rank(tmp_path):
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )
    run([sys.executable, str(WORKER), str(tmp_path / "one.json"), "none"], env)
    port = free_port()
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            str(WORKER),
            str(tmp_path / "two.json"),
            "3",
        ],
        dict(env, MASTER_PORT=str(port)),
    )
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2 and one["world"] == 1
    assert len(two["records"]) == len(one["records"]) == 13
    for a, b in zip(one["records"], two["records"]):
        assert a["example_id"] == b["example_id"]
        assert a["prediction"] == b["prediction"]
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-4, abs=1e-4)
