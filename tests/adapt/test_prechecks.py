"""`tensorpoly-ds adapt` refuses what the launcher's ranks cannot run from their variables alone: before a
process group, a model or even torch."""

import json
import os
import subprocess
import sys

from data_prep.manifest import read_manifest
from launch import adapt as adapt_cli
from launch.cli import main as cli_main
from tests.adapt.conftest import ROOT

TORCHRUN_RANK0_OF_2 = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29998",
    "TORCHELASTIC_RUN_ID": "t",
}


def args(prepared, poly_export, tmp_path, batch):
    return [
        "--export",
        str(poly_export),
        "--data",
        str(prepared),
        "--task",
        read_manifest(prepared).held_out[0],
        "--out",
        str(tmp_path / "job"),
        "--batch-size",
        str(batch),
        "--steps",
        "2",
        "--set",
        'trainer="engine"',
    ]


def test_batch_size_not_dividing_over_the_ranks_is_refused_before_torch(prepared, poly_export, tmp_path):
    code = (
        "import sys, launch.cli as c; rc = c.main(['adapt', *sys.argv[1:]]); "
        "print(rc, 'torch' in sys.modules, 'tensorpoly_ds.engine.trainer' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), **TORCHRUN_RANK0_OF_2)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args(prepared, poly_export, tmp_path, 5)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "'batch_size' = 5 does not divide over the launcher's 2 ranks" in proc.stderr
    assert not (tmp_path / "job").exists()


def test_the_same_checks_in_process(prepared, poly_export, tmp_path, monkeypatch, capsys):
    import tensorpoly_ds.engine.distributed as dist

    def boom():
        raise AssertionError("process group created before the job was checked")

    monkeypatch.setattr(dist, "init_distributed", boom)
    for key, value in TORCHRUN_RANK0_OF_2.items():
        monkeypatch.setenv(key, value)
    base = args(prepared, poly_export, tmp_path, 4)
    assert cli_main(["adapt", *base, "--set", "multitask_steps=2", "--set", "multitask_batch_size=3"]) == 2
    assert "'multitask_batch_size' = 3" in capsys.readouterr().err
    assert cli_main(["adapt", *base, "--set", 'trainer="local"']) == 2
    assert "runs one process" in capsys.readouterr().err
    assert adapt_cli.main(base + ["--print-job"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 4
