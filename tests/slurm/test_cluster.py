"""The local cluster and the per-stage sbatch scripts, on a real Slurm (scripts/slurm_local.sh)."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import SLURM_DIR

pytestmark = pytest.mark.slow


def test_sbatch_trivial_job_writes_its_output(jobs, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text('#!/bin/bash\necho "hello from $SLURM_JOB_ID on $SLURMD_NODENAME" > hello.txt\necho to-log\n')
    job = jobs.sbatch("--output=hello-%j.out", str(script))
    (state,) = jobs.wait(job, 30)
    assert state["JobState"] == "COMPLETED", state
    assert (tmp_path / "hello.txt").read_text().startswith(f"hello from {job} on node")
    assert (tmp_path / f"hello-{job}.out").read_text() == "to-log\n"


def test_two_node_srun_distinct_ranks_and_first_host(jobs, slurm_cluster):
    code = textwrap.dedent("""
        import os, json, subprocess
        first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True).stdout.split()[0]
        out = {v: os.environ.get(v) for v in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURMD_NODENAME",
                                              "SLURM_JOB_NODELIST", "SLURM_STEP_ID")}
        out["first"] = first
        from tensorpoly_ds.engine.distributed import distributed_env   # in-tree: an ImportError fails the test
        out["mapped"] = distributed_env()
        print(json.dumps(out), flush=True)
    """)
    r = slurm_cluster.run(
        ["srun", "-N2", "-n2", "--time=1", sys.executable, "-c", code],
        timeout=60,
        env=jobs.env(),
        cwd=str(jobs.workdir),
    )
    assert r.returncode == 0, r.stderr
    import json

    rows = sorted((json.loads(line) for line in r.stdout.splitlines()), key=lambda d: int(d["SLURM_PROCID"]))
    assert [d["SLURM_PROCID"] for d in rows] == ["0", "1"]
    assert {d["SLURMD_NODENAME"] for d in rows} == {"node1", "node2"}
    assert all(d["SLURM_NTASKS"] == "2" and d["SLURM_LOCALID"] == "0" for d in rows)
    assert all(d["SLURM_JOB_NODELIST"] == "node[1-2]" and d["first"] == "node1" for d in rows)
    for d in rows:
        assert d["mapped"]["LAUNCHER"] == "srun"
        assert d["mapped"]["RANK"] == d["SLURM_PROCID"] and d["mapped"]["WORLD_SIZE"] == "2"
        assert d["mapped"]["MASTER_ADDR"] == "node1"
    # the sbatch scripts use the first node's NodeAddr (node names need not resolve)
    r = slurm_cluster.run(["bash", "-c", f"source {SLURM_DIR}/lib.sh; SLURM_JOB_NODELIST='node[1-2]' tpds_master_addr"])
    assert r.stdout.strip() == "127.0.0.1", r.stderr


def test_adapt_array_runs_each_row_once_with_own_port_and_extensions_dir(jobs, tmp_path):
    table = tmp_path / "jobs.jsonl"
    table.write_text("".join(f'{{"row": {i}, "id": "r{i}", "job": {{}}}}\n' for i in range(3)))
    seed = _ext_seed(tmp_path)
    r = subprocess.run(
        [
            "bash",
            str(SLURM_DIR / "submit_array.sh"),
            "--parallel",
            "2",
            str(table),
            f"--output={tmp_path}/adapt-%A_%a.out",
            "--",
            "--force",
        ],
        capture_output=True,
        text=True,
        env=jobs.env(MASTER_PORT="29500", TPDS_TORCH_EXT_SEED=seed),
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    array = jobs.track(r.stdout.strip())
    shown = jobs.wait(array, 60)
    assert sorted(s["ArrayTaskId"] for s in shown) == ["0", "1", "2"]
    assert {s["JobState"] for s in shown} == {"COMPLETED"}, shown
    recs = jobs.records("adapt")
    assert sorted(int(rec["SLURM_ARRAY_TASK_ID"]) for rec in recs) == [0, 1, 2]
    for rec in recs:
        i = rec["SLURM_ARRAY_TASK_ID"]
        assert rec["args"] == ["--job-table", str(table), "--row", i, "--force"]
        assert rec["SLURM_ARRAY_JOB_ID"] == array
        assert rec["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_ext" / f"{array}_{i}")
        assert rec["OMP_NUM_THREADS"] == "2"  # --cpus-per-task of adapt_array.sbatch
        assert rec["ext_files"] == ["fused_op/fused_op.so"]  # seeded, without the stale build lock
    ports = [rec["MASTER_PORT"] for rec in recs]
    assert len(set(ports)) == 3 and "29500" not in ports  # an inherited MASTER_PORT is not reused
    assert len({rec["TORCH_EXTENSIONS_DIR"] for rec in recs}) == 3


def test_adapt_array_task_stopped_by_usr1_requeues_itself_and_reruns(jobs, tmp_path):
    """The time-limit signal of an array task reaches `adapt` (which checkpoints and exits 124): the task
    requeues itself and its rerun (same task, restart 1) finishes the row."""
    table = tmp_path / "jobs.jsonl"
    table.write_text('{"row": 0, "id": "r0", "job": {}}\n')
    r = subprocess.run(
        ["bash", str(SLURM_DIR / "submit_array.sh"), str(table), f"--output={tmp_path}/adapt-%A_%a.out"],
        capture_output=True,
        text=True,
        env=jobs.env(TPDS_TEST_USR1="1"),
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    array = jobs.track(r.stdout.strip())
    jobs.wait_for(lambda: [x for x in jobs.records("adapt") if x["event"] == "ready"], 60, "the first run")
    r = jobs.cluster.run(["scancel", "--signal=USR1", "--batch", f"{array}_0"])
    assert r.returncode == 0, r.stderr
    (state,) = jobs.wait(array, 120)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, jobs.logs())
    events = [(x["SLURM_RESTART_COUNT"] or "0", x["event"]) for x in jobs.records("adapt")]
    assert events == [("0", "ready"), ("0", "usr1"), ("1", "done")], events
    log = (tmp_path / f"adapt-{array}_0.out").read_text()
    assert "SIGUSR1: forwarding" in log and "requeuing job" in log


def _ext_seed(tmp_path) -> str:
    """A fake prebuilt torch-extensions directory, with a stale lock that must not be copied."""
    seed = tmp_path / "ext_seed" / "fused_op"
    seed.mkdir(parents=True)
    (seed / "fused_op.so").write_text("built")
    (seed / "lock").write_text("")
    return str(seed.parent)


def _pretrain_usr1(jobs, tmp_path, extra: list[str], send_signal: bool, mode: str = "1"):
    env = jobs.env(TPDS_TEST_USR1=mode, TPDS_SRUN_WAIT="30", TPDS_TORCH_EXT_SEED=_ext_seed(tmp_path))
    job = jobs.sbatch(
        "-N2",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/pretrain-%j.out",
        *extra,
        str(SLURM_DIR / "pretrain.sbatch"),
        "--config",
        "cfg.yaml",
        "train.steps=5",
        env=env,
    )
    jobs.wait_for(
        lambda: len([r for r in jobs.records("pretrain") if r["event"] == "ready"]) == 2,
        60,
        "both ranks of the first run",
    )
    if send_signal:  # what Slurm does at the --signal=B:USR1@T time: signal the batch shell only
        r = jobs.cluster.run(["scancel", "--signal=USR1", "--batch", job])
        assert r.returncode == 0, r.stderr
    (state,) = jobs.wait(job, 120, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert state["JobState"] == "COMPLETED", (state, jobs.logs())
    assert state["Restarts"] == "1"
    recs = jobs.records("pretrain")
    first = [r for r in recs if r["SLURM_RESTART_COUNT"] in (None, "0")]
    second = [r for r in recs if r["SLURM_RESTART_COUNT"] == "1"]
    if mode == "1":
        assert sorted((r["SLURM_PROCID"], r["event"]) for r in first) == [
            ("0", "ready"),
            ("0", "usr1"),
            ("1", "ready"),
            ("1", "usr1"),
        ]
    else:  # killed by the signal: only "ready" was written
        assert sorted((r["SLURM_PROCID"], r["event"]) for r in first) == [("0", "ready"), ("1", "ready")]
    assert sorted((r["SLURM_PROCID"], r["event"]) for r in second) == [("0", "done"), ("1", "done")]
    assert {r["SLURMD_NODENAME"] for r in second} == {"node1", "node2"}
    for r in recs:
        assert r["args"] == ["--resume", "auto", "--config", "cfg.yaml", "train.steps=5"]
        assert r["MASTER_ADDR"] == "127.0.0.1" and r["MASTER_PORT"] == recs[0]["MASTER_PORT"]
        assert r["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_ext" / job) and r["ext_files"] == [
            "fused_op/fused_op.so"
        ]
    log = (tmp_path / f"pretrain-{job}.out").read_text()  # one log for both runs (--open-mode=append)
    assert "SIGUSR1: forwarding" in log and f"requeuing job {job}" in log and "restarts=1" in log
    return job


def test_usr1_is_forwarded_and_exit_124_requeues(jobs, tmp_path):
    _pretrain_usr1(jobs, tmp_path, [], send_signal=True)


def test_usr1_before_the_trainer_handles_it_still_requeues(jobs, tmp_path):
    """A signal during start-up kills the ranks (status 138): the job is requeued, not failed."""
    job = _pretrain_usr1(jobs, tmp_path, [], send_signal=True, mode="early")
    assert "killed by SIGUSR1 before handling it" in (tmp_path / f"pretrain-{job}.out").read_text()


def test_time_limit_signal_reaches_the_ranks(jobs, tmp_path):
    """The real path: Slurm itself sends B:USR1 ahead of the time limit (checked every ~30 s by slurmctld)."""
    _pretrain_usr1(jobs, tmp_path, ["--time=2", "--signal=B:USR1@115", "--cpus-per-task=1"], send_signal=False)


def _conf_ports(conf: Path) -> tuple[int, list[int]]:
    """slurmctld's port and the slurmd ports a generated slurm.conf declares."""
    text = conf.read_text()
    ctld = int(re.search(r"^SlurmctldPort=(\d+)$", text, re.M).group(1))
    first, _, last = re.search(r"^NodeName=.* Port=(\d+)(-(\d+))?", text, re.M).group(1, 2, 3)
    return ctld, list(range(int(first), int(last or first) + 1))


@contextlib.contextmanager
def _listening(ports):
    """Listen on those of `ports` that are free, as another Slurm on its ports would."""
    with contextlib.ExitStack() as stack:
        for port in ports:
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("", port))
            except OSError:  # already taken (by the session's cluster, say): just as good
                continue
            s.listen()
        yield


def test_local_cluster_lifecycle_is_idempotent(slurm_cluster, tmp_path):
    """A second, one-node cluster beside the session's while the default ports (16817, 17001) are taken:
    it picks free ports, starts twice, stops, restarts on the same ports, cleans up; a port given
    explicitly that is taken fails naming it. Mutation seen caught: choose_ports ignoring ports_busy
    (always the defaults): the second cluster never comes up ("nodes not idle after 90s", sinfo: "Socket
    timed out")."""
    import tempfile

    from .conftest import LOCAL

    # munged wants every directory above its socket searchable by all: pytest's tmp_path (0700) is not
    tmp_path = Path(tempfile.mkdtemp(prefix="tpds-slurm-test-", dir="/tmp"))
    tmp_path.chmod(0o755)
    env = slurm_cluster.env(TPDS_SLURM_DIR=str(tmp_path / "c2"), TPDS_SLURM_NODES="1", TPDS_SLURM_LINK_CONF="0")
    for var in ("TPDS_SLURM_CTLD_PORT", "TPDS_SLURM_NODE_PORT"):
        env.pop(var, None)
    env["SLURM_CONF"] = str(tmp_path / "c2" / "slurm.conf")
    first_ctld, first_nodes = _conf_ports(Path(slurm_cluster.conf))

    def local(cmd, timeout=120, **extra):
        r = subprocess.run(
            ["bash", str(LOCAL), cmd], capture_output=True, text=True, env={**env, **extra}, timeout=timeout
        )
        return r

    def pids():  # the daemons' pid files (an idempotent start leaves the same daemons running)
        return {p.name: p.read_text() for p in (tmp_path / "c2" / "run").glob("*.pid")}

    try:
        r = local("start", TPDS_SLURM_CTLD_PORT=str(first_ctld))
        assert r.returncode != 0 and f"TPDS_SLURM_CTLD_PORT={first_ctld} is in use" in r.stderr, r.stderr
        with _listening([16817, 17001]):
            r = local("start")
            assert r.returncode == 0, r.stderr
            ctld, node_ports = _conf_ports(tmp_path / "c2" / "slurm.conf")
            taken = {16817, 17001, first_ctld, *first_nodes}
            assert ctld not in taken and not taken & set(node_ports), (ctld, node_ports, taken)
            before = pids()
            r = local("start")
            assert r.returncode == 0 and "already running" in r.stderr, r.stderr
            assert pids() == before and len(before) == 2, (before, pids())  # slurmctld + slurmd node1
            r = local("status")
            assert r.returncode == 0 and "node1" in r.stdout, r.stdout
            out = subprocess.run(["srun", "-N1", "hostname"], capture_output=True, text=True, env=env, timeout=60)
            assert out.returncode == 0, out.stderr
            r = local("stop")
            assert r.returncode == 0, r.stderr
            r = local("status")
            assert r.returncode != 0 and "slurmctld: stopped" in r.stdout
            r = local("start")
            assert r.returncode == 0, r.stderr
            assert _conf_ports(tmp_path / "c2" / "slurm.conf") == (ctld, node_ports)  # kept across a restart
    finally:
        r = local("clean")
        cleaned = r.returncode == 0 and not (tmp_path / "c2").exists()
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert cleaned, r.stderr
    r = local("install")  # already installed: a check, no apt
    assert r.returncode == 0 and "already installed" in r.stderr


def test_sbatch_script_finds_its_helpers_without_tpds_slurm_home(jobs, tmp_path):
    """`sbatch slurm/report.sbatch ...` from any directory: Slurm runs a spooled copy, lib.sh is found via
    the submitted script's path; the env file is sourced."""
    env = jobs.env()
    del env["TPDS_SLURM_HOME"]
    (tmp_path / "env.sh").write_text("export TPDS_TEST_FROM_ENV_FILE=yes\n")
    env["TPDS_ENV_FILE"] = str(tmp_path / "env.sh")
    job = jobs.sbatch(
        f"--output={tmp_path}/report-%j.out", str(SLURM_DIR / "report.sbatch"), "runs", "--out", "rep", env=env
    )
    (state,) = jobs.wait(job, 30)
    assert state["JobState"] == "COMPLETED", jobs.logs()
    (rec,) = jobs.records("report")
    assert rec["args"] == ["runs", "--out", "rep"] and rec["TPDS_TEST_FROM_ENV_FILE"] == "yes"


def test_requeue_loop_is_bounded(jobs, tmp_path):
    """A trainer that always exits 124 is requeued TPDS_MAX_REQUEUES times, then the job fails."""
    env = jobs.env(TPDS_TEST_USR1="always124", TPDS_MAX_REQUEUES="1")
    job = jobs.sbatch(
        "-N1", f"--output={tmp_path}/pretrain-%j.out", str(SLURM_DIR / "pretrain.sbatch"), "--config", "c.yaml", env=env
    )
    (state,) = jobs.wait(job, 90)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1" and state["ExitCode"] == "124:0", state
    assert [r["SLURM_RESTART_COUNT"] or "0" for r in jobs.records("pretrain")] == ["0", "1"]
    assert "already requeued 1 times" in (tmp_path / f"pretrain-{job}.out").read_text()
