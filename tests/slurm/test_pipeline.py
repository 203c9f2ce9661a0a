"""slurm/submit_pipeline.sh: the dry run (no Slurm needed) and a real chained submission with stand-in stages."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import SLURM_DIR

SUBMIT = SLURM_DIR / "submit_pipeline.sh"


def _fake_sbatch_path(tmp_path: Path) -> dict[str, str]:
    """PATH with an `sbatch` that records being called: a dry run must never call it."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\necho called >> {tmp_path}/sbatch-called\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def _commands(stdout: str) -> list[list[str]]:
    """The sbatch command lines of a dry run, split like the shell would (placeholders kept)."""
    out = []
    for line in stdout.splitlines():
        if not line.startswith(("sbatch ", "env ")):
            continue
        words = shlex.split(line)
        if words and words[0] == "env":
            words = words[next(i for i, w in enumerate(words) if w == "sbatch") :]
        if words and words[0] == "sbatch":
            out.append(words)
    return out


def _opt(cmd: list[str], name: str) -> str | None:
    vals = [w.split("=", 1)[1] for w in cmd if w.startswith(name + "=")]
    return vals[-1] if vals else None


def test_dry_run_with_table_prints_a_correctly_chained_pipeline(tmp_path):
    table = tmp_path / "jobs.jsonl"
    table.write_text('{"row": 0}\n{"row": 1}\n\n{"row": 2}\n')
    env_file = tmp_path / "env.sh"
    env_file.write_text("module load cuda\n")
    r = subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--dry-run",
            "--prep-arg",
            "--out",
            "--prep-arg",
            "/data/with space",
            "--pretrain-config",
            "base.yaml",
            "--pretrain-config",
            "poly.yaml",
            "--pretrain-arg",
            "run.dir=runs/p",
            "--table",
            str(table),
            "--report-out",
            "rep",
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--time",
            "1:00:00",
            "--pretrain-time",
            "2-00:00:00",
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--parallel",
            "2",
            "--env-file",
            str(env_file),
            "--log-dir",
            "logs",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_fake_sbatch_path(tmp_path),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "sbatch-called").exists()
    assert f"export TPDS_ENV_FILE={env_file}" in r.stdout
    prep, pretrain, adapt, report = _commands(r.stdout)
    assert prep[-3:] == [str(SLURM_DIR / "prep.sbatch"), "--out", "/data/with space"]
    assert _opt(prep, "--dependency") is None
    assert _opt(pretrain, "--dependency") == "afterok:<prep>"
    assert pretrain[pretrain.index(str(SLURM_DIR / "pretrain.sbatch")) :] == [
        str(SLURM_DIR / "pretrain.sbatch"),
        "--config",
        str(tmp_path / "base.yaml"),
        "--config",
        str(tmp_path / "poly.yaml"),
        "run.dir=runs/p",
    ]
    assert (_opt(pretrain, "--nodes"), _opt(pretrain, "--ntasks-per-node"), _opt(pretrain, "--gpus-per-node")) == (
        "2",
        "4",
        "4",
    )
    assert _opt(pretrain, "--time") == "2-00:00:00" and _opt(pretrain, "--signal") == "B:USR1@120"
    assert _opt(adapt, "--dependency") == "afterok:<pretrain>"
    assert _opt(adapt, "--array") == "0-2%2"  # 3 non-blank rows, at most 2 at once
    assert _opt(adapt, "--gpus") == "1" and _opt(adapt, "--time") == "1:00:00"
    assert adapt[-2:] == [str(SLURM_DIR / "adapt_array.sbatch"), str(table)]
    assert _opt(report, "--dependency") == "afterok:<adapt>"
    assert report[-5:] == [str(tmp_path), "--out", str(tmp_path / "rep"), "--job-table", str(table)]
    for cmd in (prep, pretrain, adapt, report):
        assert _opt(cmd, "--partition") == "gpu" and _opt(cmd, "--account") == "proj"
        assert _opt(cmd, "--kill-on-invalid-dep") == "yes"
        assert _opt(cmd, "--output").startswith(str(tmp_path / "logs") + "/")


def test_dry_run_with_grid_defers_the_array_to_the_sweep_job(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: []\n")
    r = subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--dry-run",
            "--pretrain-config",
            "c.yaml",
            "--grid",
            str(grid),
            "--sweep-out",
            "sw",
            "--report-out",
            "rep",
            "--report-after",
            "any",
            "--after",
            "77",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_fake_sbatch_path(tmp_path),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    pretrain, sweep, report = _commands(r.stdout)
    assert _opt(pretrain, "--dependency") == "afterok:77"
    assert _opt(sweep, "--dependency") == "afterok:<pretrain>"
    assert sweep[-4:] == [str(SLURM_DIR / "sweep.sbatch"), str(tmp_path / "sw"), "--grid", str(grid)]
    assert _opt(report, "--dependency") == "afterok:<sweep>"
    later = [line for line in r.stdout.splitlines() if "submit_array.sh" in line]
    assert len(later) == 1 and "TPDS_REPORT_DEPENDENCY=afterany" in later[0]
    assert "--report-job '<report>'" in later[0] or "--report-job \\<report\\>" in later[0]
    assert str(tmp_path / "sw" / "jobs.jsonl") in later[0]
    assert "--hold" in sweep  # released once its argument file is written
    assert r.stdout.rstrip().splitlines()[-1] == "scontrol release \\<sweep\\>"


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to submit"),
        (["--grid", "g.yaml"], "--sweep-out"),
        (["--table", "missing.jsonl"], "not readable"),
        (["--report-out", "r", "--nodes", "two"], "non-negative integer"),
        (["--bogus", "1"], "unknown option"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, args, message):
    (tmp_path / "g.yaml").write_text("{}\n")
    r = subprocess.run(
        ["bash", str(SUBMIT), "--dry-run", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_fake_sbatch_path(tmp_path),
        timeout=30,
    )
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not on PATH (apt-get install shellcheck)")
def test_scripts_are_shellcheck_clean():
    files = sorted(
        map(
            str, [*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("*.sbatch"), SLURM_DIR.parent / "scripts" / "slurm_local.sh"]
        )
    )
    r = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_real_pipeline_runs_stages_in_dependency_order(jobs, tmp_path):
    """prep -> pretrain -> sweep (writes a 3-row table, submits the array) -> adapt x3 -> report, stand-ins."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: []\n")
    env_file = tmp_path / "env.sh"
    env_file.write_text("export TPDS_TEST_FROM_ENV_FILE=yes\n")
    env = jobs.env(TPDS_TEST_SLEEP="0.5")
    r = subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--prep-arg",
            "--out",
            "--prep-arg",
            str(tmp_path / "data"),
            "--pretrain-config",
            "cfg.yaml",
            "--pretrain-arg",
            "run.dir=runs/p",
            "--nodes",
            "2",
            "--grid",
            str(grid),
            "--sweep-out",
            "sweep",
            "--report-out",
            "report",
            "--parallel",
            "2",
            "--adapt-cpus",
            "1",
            "--prep-cpus",
            "1",
            "--time",
            "5",
            "--env-file",
            str(env_file),
            "--log-dir",
            "logs",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines() if not line.startswith("#"))
    assert list(ids) == ["prep", "pretrain", "sweep", "report"]
    for job in ids.values():
        jobs.track(job)
    (report,) = jobs.wait(ids["report"], 150)
    array = (tmp_path / "sweep" / "adapt_array.jobid").read_text().strip()
    jobs.track(array)
    assert report["JobState"] == "COMPLETED", jobs.logs()
    assert report["Dependency"] in ("(null)", ""), report  # satisfied (it pointed at the array)
    for stage in ("prep", "pretrain", "sweep"):
        (state,) = jobs.show(ids[stage])
        assert state["JobState"] == "COMPLETED", (stage, state)
    shown = jobs.show(array)
    assert sorted(s["ArrayTaskId"] for s in shown) == ["0", "1", "2"]
    assert {s["JobState"] for s in shown} == {"COMPLETED"}

    rec = {stage: jobs.records(stage) for stage in ("prep", "pretrain", "sweep", "adapt", "report")}
    assert [len(rec[s]) for s in rec] == [1, 2, 1, 3, 1]
    assert all(r_["TPDS_TEST_FROM_ENV_FILE"] == "yes" for rs in rec.values() for r_ in rs)
    assert rec["prep"][0]["args"] == ["--out", str(tmp_path / "data")]
    assert rec["pretrain"][0]["args"] == ["--resume", "auto", "--config", str(tmp_path / "cfg.yaml"), "run.dir=runs/p"]
    assert rec["sweep"][0]["args"] == ["--out", str(tmp_path / "sweep"), "--expand-only", "--grid", str(grid)]
    table = str(tmp_path / "sweep" / "jobs.jsonl")
    assert sorted(r_["args"][3] for r_ in rec["adapt"]) == ["0", "1", "2"]
    assert all(r_["args"][:2] == ["--job-table", table] for r_ in rec["adapt"])
    assert rec["report"][0]["args"] == [
        str(tmp_path / "sweep"),
        "--out",
        str(tmp_path / "report"),
        "--job-table",
        table,
    ]

    def span(stage):
        return min(r_["start"] for r_ in rec[stage]), max(r_["end"] for r_ in rec[stage])

    order = ["prep", "pretrain", "sweep", "adapt", "report"]
    for before, after in zip(order, order[1:]):
        assert span(before)[1] <= span(after)[0], f"{after} started before {before} ended"


@pytest.mark.slow
def test_failed_stage_cancels_the_rest_of_the_chain(jobs, tmp_path):
    table = tmp_path / "jobs.jsonl"
    table.write_text('{"row": 0}\n{"row": 1}\n')
    env = jobs.env(TPDS_TEST_FAIL="pretrain")
    r = subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--pretrain-config",
            "cfg.yaml",
            "--table",
            str(table),
            "--report-out",
            "rep",
            "--log-dir",
            "logs",
            "--time",
            "5",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines() if not line.startswith("#"))
    assert list(ids) == ["pretrain", "adapt", "report"]
    for job in ids.values():
        jobs.track(job)
    (pre,) = jobs.wait(ids["pretrain"], 60)
    assert pre["JobState"] == "FAILED"
    for stage in ("adapt", "report"):
        states = jobs.wait(ids[stage], 60)
        assert {s["JobState"] for s in states} == {"CANCELLED"}, (stage, states)
    assert jobs.records("adapt") == [] and jobs.records("report") == []


@pytest.mark.slow
def test_report_after_any_runs_when_adaptation_rows_fail(jobs, tmp_path):
    table = tmp_path / "jobs.jsonl"
    table.write_text('{"row": 0}\n{"row": 1}\n')
    env = jobs.env(TPDS_TEST_FAIL="adapt")
    r = subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--table",
            str(table),
            "--report-out",
            "rep",
            "--report-after",
            "any",
            "--log-dir",
            "logs",
            "--time",
            "5",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines() if not line.startswith("#"))
    assert list(ids) == ["adapt", "report"]
    for job in ids.values():
        jobs.track(job)
    (report,) = jobs.wait(ids["report"], 60)
    assert report["JobState"] == "COMPLETED"
    assert {s["JobState"] for s in jobs.show(ids["adapt"])} == {"FAILED"}
    assert [r_["event"] for r_ in jobs.records("adapt")] == ["fail", "fail"]
    assert len(jobs.records("report")) == 1


@pytest.mark.slow
def test_grid_pipeline_without_upstream_jobs_does_not_race(jobs, tmp_path):
    """Only sweep -> array -> report: the sweep job has no dependency, so it is held until the submitter has
    written its argument file."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: []\n")
    r = subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--grid",
            str(grid),
            "--sweep-out",
            "sweep",
            "--report-out",
            "report",
            "--log-dir",
            "logs",
            "--time",
            "5",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=jobs.env(TPDS_TEST_ROWS="2"),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines() if not line.startswith("#"))
    assert list(ids) == ["sweep", "report"]
    for job in ids.values():
        jobs.track(job)
    (report,) = jobs.wait(ids["report"], 90)
    assert report["JobState"] == "COMPLETED", jobs.logs()
    assert sorted(r_["args"][3] for r_ in jobs.records("adapt")) == ["0", "1"]
