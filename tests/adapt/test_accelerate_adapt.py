"""Few-shot adaptation under `accelerate launch` (DeepSpeed plugin, ZeRO-2) on 2 CPU ranks."""

import json
import subprocess
import sys

import pytest

from tests.adapt.conftest import ROOT
from tests.adapt.test_engine_path import adapt_args, check_z, env

pytestmark = pytest.mark.slow


def test_accelerate_launch_runs_an_adaptation_job_on_two_ranks(prepared, poly_export, tmp_path):
    e, port = env()
    base = adapt_args(prepared, poly_export, tmp_path / "job", "z", 0)
    args = []  # without --set zero_stage / trainer: the plugin's ZeRO stage and the engine are used
    for flag, value in zip(base, base[1:] + [None]):
        if value in ("zero_stage=0", 'trainer="engine"') or flag in ("zero_stage=0", 'trainer="engine"'):
            continue
        args.append(flag)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = check_z(tmp_path / "job", poly_export)
    assert result["world_size"] == 2
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert (job["zero_stage"], job["trainer"]) == (2, "engine")
