"""Fixtures for the Slurm tests: a real local cluster (scripts/slurm_local.sh) and job bookkeeping.

The cluster fixture skips only when the Slurm client (`sinfo`) is not on PATH; otherwise it starts the
cluster (idempotent, ~1 s when installed) and stops it at the end of the session if it started it.
Every job a test submits is cancelled at teardown (tracked ids, plus anything running from the
test's directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
LOCAL = REPO / "scripts" / "slurm_local.sh"
STAND_IN = Path(__file__).resolve().parent / "stand_in.py"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


class Cluster:
    def __init__(self, conf: str):
        self.conf = conf

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        for var in [v for v in env if v.startswith(("SLURM_JOB", "SLURM_ARRAY", "SBATCH_", "SRUN_"))]:
            del env[var]  # a test run inside a Slurm job must not leak its job into ours
        env.pop("MASTER_PORT", None)
        env.pop("MASTER_ADDR", None)
        env.pop("TORCH_EXTENSIONS_DIR", None)
        env.update(extra)
        return env

    def run(self, args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def slurm_cluster():
    if shutil.which("sinfo") is None:
        why = "Slurm client `sinfo` is not on PATH (install: bash scripts/slurm_local.sh install)"
        if os.environ.get("TPDS_SLURM_REQUIRED") == "1":  # scripts/test.sh --slurm: CI must run these tests
            pytest.fail(f"{why}, but TPDS_SLURM_REQUIRED=1")
        pytest.skip(why)
    state = os.environ.get("TPDS_SLURM_DIR", "/tmp/tpds-slurm")
    was_running = subprocess.run(["bash", str(LOCAL), "status"], capture_output=True, timeout=60).returncode == 0
    r = subprocess.run(["bash", str(LOCAL), "start"], capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        pytest.fail(f"scripts/slurm_local.sh start failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    yield Cluster(os.path.join(state, "slurm.conf"))
    if not was_running:
        subprocess.run(["bash", str(LOCAL), "stop"], capture_output=True, timeout=120)


class Jobs:
    """Submit, poll and clean up jobs of one test."""

    def __init__(self, cluster: Cluster, workdir: Path):
        self.cluster = cluster
        self.workdir = workdir
        self.ids: list[str] = []
        self.record = workdir / "record"
        self.record.mkdir(exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "TPDS_TEST_RECORD": str(self.record),
            "TPDS_SLURM_HOME": str(SLURM_DIR),
            "TPDS_TORCH_EXT_ROOT": str(self.workdir / "torch_ext"),
        }  # job ids restart with a new cluster
        for stage in ("prep", "pretrain", "sweep", "adapt", "report"):
            base[f"TPDS_{stage.upper()}_CMD"] = f"{sys.executable} {STAND_IN} {stage}"
        return self.cluster.env(**{**base, **extra})

    def track(self, job_id: str) -> str:
        self.ids.append(job_id)
        return job_id

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        r = self.cluster.run(["sbatch", "--parsable", *args], env=env or self.env(), cwd=self.workdir)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        return self.track(r.stdout.strip().split(";")[0])

    def records(self, stage: str) -> list[dict]:
        path = self.record / f"{stage}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def show(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol -o show job` as dicts (one per array task once the array is split)."""
        r = self.cluster.run(["scontrol", "-o", "show", "job", job_id])
        if r.returncode != 0:
            return []
        out = []
        for line in r.stdout.splitlines():
            out.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
        return out

    def wait(self, job_id: str, timeout: float, states: set[str] | None = None) -> list[dict[str, str]]:
        """Poll until every record of job_id is in a terminal state (or in `states`)."""
        want = states or TERMINAL
        deadline = time.time() + timeout
        shown: list[dict[str, str]] = []
        while time.time() < deadline:
            shown = self.show(job_id)
            if shown and all(s.get("JobState") in want for s in shown):
                return shown
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} not in {sorted(want)} after {timeout}s: "
            f"{[(s.get('JobId'), s.get('JobState'), s.get('Reason')) for s in shown]}\n"
            f"logs:\n{self.logs()}"
        )

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\nlogs:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for p in sorted(self.workdir.rglob("*.out")):
            parts.append(f"--- {p.name}\n{p.read_text()[-3000:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        ids = list(self.ids)
        r = self.cluster.run(["squeue", "-h", "-o", "%A %Z"])
        for line in r.stdout.splitlines():
            job, _, workdir = line.partition(" ")
            if workdir.startswith(str(self.workdir)):
                ids.append(job)
        if ids:
            self.cluster.run(["scancel", "--full", *ids])
            self.cluster.run(["scancel", *ids])


@pytest.fixture
def jobs(slurm_cluster, tmp_path):
    j = Jobs(slurm_cluster, tmp_path)
    yield j
    j.cleanup()
