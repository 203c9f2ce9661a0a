"""The real pipeline on the local 2-node Slurm cluster gives the numbers of the same pipeline run directly.

One test, 3-5.5 minutes here (176 s with the machine's load average at ~8, 326 s at ~24); it runs whenever
Slurm is installed (CI: `scripts/test.sh --slurm`, where a skip is turned into a failure by
TPDS_SLURM_REQUIRED=1).

Under Slurm (`slurm/submit_pipeline.sh`, every stage the real `tensorpoly-ds` command):
  prep (embedded mixture) -> pretrain (tiny_cpu.yaml, 2 nodes x 1 rank under srun, DeepSpeed on CPU/gloo)
  -> sweep (expands the grid after pretraining: the rows name the export) -> adapt array (2 tasks x 2 seeds)
  -> report --strict,
with two failures injected on the way:
  1. the pretrain job gets the time-limit signal mid-run (`scancel --signal=USR1 --batch`, what
     `--signal=B:USR1@N` delivers at the limit, sent at a chosen step instead of waiting for one): the ranks
     checkpoint and exit 124, the job requeues itself and its second run resumes from that checkpoint;
  2. one array task's `adapt` process is SIGKILLed mid-row: the task fails, the report (afterok) is cancelled,
     and the documented recovery, resubmitting the job table with `submit_pipeline.sh --table ... --report-out`,
     reruns only that row (complete rows are skipped) and reports.
Directly (no Slurm): prep, `torch.distributed.run` with 2 ranks (the same world size, gloo, one thread per
rank as under Slurm), `sweep --workers 2 --threads-per-job 1`, report. The direct pipeline runs in a thread
while the Slurm one waits on its scheduler.

Compared: the pretrained exports (bitwise: the same computation on the same 2 ranks; resume is exact),
then every row's accuracies, train losses and per-example scores, and the report's table1.csv (bitwise: the
same adaptation of the same export on one thread).

Mutations tried (each made this test fail):
- `slurm/pretrain.sbatch` running the stage with `--resume none` (the requeued run starts over from step 0):
  no "resumed from" line (the export alone would not tell: 40 steps from scratch give the same numbers).
- the engine's resume not restoring the data stream's position (trainer.py, `stream.load_state_dict` left
  out): the requeued run's export differs from the direct run's.
- `slurm/submit_array.sh` submitting `--array=0-(N-2)` (one row's result dropped): the array's task states.
- `slurm/lib.sh` not requeueing on exit 124: the pretrain job fails, the sweep is cancelled, and the test
  fails at once naming the ended job instead of waiting out its timeouts.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import REPO, SLURM_DIR, TERMINAL

pytestmark = pytest.mark.slow

SUBMIT = SLURM_DIR / "submit_pipeline.sh"
TINY = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"
STEPS = 40
SIGNAL_AT = 6  # the time-limit signal goes to the batch shell once step >= SIGNAL_AT is logged
PRETRAIN_ARGS = [
    f"train.steps={STEPS}",
    "train.eval_every=0",
    "train.save_every=0",
    "train.log_every=1",
    "train.progress_bar=false",
    "train.heatmap_max_layers=0",
    "data.val_max_samples=100",
]
PREP_ARGS = ["--mixture", "embedded", "--source", "embedded", "--tokenizer", "embedded"]
# paths relative to the grid file, so the same grid serves both pipelines
GRID = """\
base: {data_dir: data, model: tiny, steps: 12, batch_size: 4, eval_every: 0, max_eval_examples: 48,
       trainer: local}
methods:
  - {label: Poly, export: pretrain/export}
modes: [full]
tasks: [emb_sort_then_reverse, emb_reverse_then_first3]
seeds: [0, 1024]
"""
KILLED_ROW = 0


def _env(**extra: str) -> dict[str, str]:
    """What both pipelines share: this tree first on the path, DeepSpeed on CPU, one thread per process."""
    env = {
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.update(extra)
    return env


def _built_torch_extensions() -> Path:
    """DeepSpeed's CPU communication op, built (or found) once in the session's cache: the jobs copy it
    (TPDS_TORCH_EXT_SEED) instead of each building its own (a minute each)."""
    ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or REPO / ".torch_extensions")
    env = {**os.environ, **_env(TORCH_EXTENSIONS_DIR=str(ext))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    build = "from tensorpoly_ds.engine.distributed import init_distributed; init_distributed()"
    r = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return ext


class DirectPipeline(threading.Thread):
    """The non-Slurm pipeline in a thread (its stages run one after another); stop() ends the running stage's
    whole process group, so a failing test leaves no rank behind."""

    def __init__(self, out: Path, ext: Path):
        super().__init__(daemon=True)
        self.out, self.ext = out, ext
        self.error: BaseException | None = None
        self._proc: subprocess.Popen | None = None
        self._stopped = False

    def _stage(self, what: str, cmd: list[str], env: dict[str, str], timeout: float) -> None:
        if self._stopped:
            raise RuntimeError("stopped")
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=self.out,
            start_new_session=True,
        )
        out, err = self._proc.communicate(timeout=timeout)
        code = self._proc.returncode
        assert code == 0, f"direct {what} exited {code}:\n{out[-3000:]}\n{err[-5000:]}"

    def run(self) -> None:
        from tpds_common.net import free_port

        out = self.out
        env = {**os.environ, **_env(TORCH_EXTENSIONS_DIR=str(self.ext))}
        for var in ("SLURM_CONF", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        cli = [sys.executable, "-m", "launch.cli"]
        try:
            self._stage("prep", [*cli, "prep", *PREP_ARGS, "--out", str(out / "data")], env, 300)
            self._stage(
                "pretrain",
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "--master_port",
                    str(free_port()),
                    str(REPO / "launch" / "pretrain.py"),
                    "--config",
                    str(TINY),
                    "--resume",
                    "auto",
                    f"data.dir={out / 'data'}",
                    f"run.dir={out / 'pretrain'}",
                    *PRETRAIN_ARGS,
                ],
                env,
                600,
            )
            self._stage(
                "sweep",
                [
                    *cli,
                    "sweep",
                    "--grid",
                    str(out / "grid.yaml"),
                    "--out",
                    str(out / "sweep"),
                    "--workers",
                    "2",
                    "--threads-per-job",
                    "1",
                ],
                env,
                600,
            )
            self._stage(
                "report", [*cli, "report", str(out / "sweep"), "--out", str(out / "report"), "--strict"], env, 300
            )
        except Exception as err:  # re-raised in the test's thread by result()
            self.error = err

    def stop(self) -> None:
        self._stopped = True
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)

    def result(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"the direct pipeline did not finish within {timeout}s"
        if self.error is not None:
            raise self.error


def _submit(jobs, cwd: Path, env: dict[str, str], *args: str) -> dict[str, str]:
    r = subprocess.run(
        ["bash", str(SUBMIT), "--log-dir", "logs", "--time", "20", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines() if not line.startswith("#"))
    for job in ids.values():
        jobs.track(job)
    return ids


def _wait_while_running(jobs, job_id: str, ready, timeout: float, what: str):
    """ready()'s first true value; fails at once (with the logs) if job_id ends before that."""
    last_check = [0.0]

    def check():
        value = ready()
        if value or time.monotonic() - last_check[0] < 2:
            return value
        last_check[0] = time.monotonic()
        shown = jobs.show(job_id)
        if shown and all(s.get("JobState") in TERMINAL for s in shown):
            value = ready()
            assert value, (
                f"job {job_id} ended ({[s.get('JobState') for s in shown]}) before {what}\n{jobs.logs()[-6000:]}"
            )
        return value

    return jobs.wait_for(check, timeout, what)


def _train_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "train"' in line]


def _kill_adapt_of(out_dir: Path) -> int | None:
    """SIGKILL the live `adapt` process holding out_dir (named by its lock's holder file); its pid, or None
    while no such process runs."""
    holder = out_dir / ".tpds.lock.json"
    try:
        pid = json.loads(holder.read_text())["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError):
        return None
    if b"adapt" not in cmdline:
        return None
    os.kill(pid, signal.SIGKILL)
    return pid


def _rows(sweep: Path) -> dict[str, dict]:
    """Row id -> what the row computed (accuracies, losses, per-example scores)."""
    out = {}
    for line in (sweep / "jobs.jsonl").read_text().splitlines():
        row = json.loads(line)
        job_dir = Path(row["job"]["out_dir"])
        result = json.loads((job_dir / "result.json").read_text())
        assert result["status"] == "complete", (job_dir, result["status"])
        out[row["id"]] = {
            "final": result["final"],
            "best": result["best"],
            "evaluations": result["evaluations"],
            "train_loss": result["train_loss"],
            "predictions": (job_dir / "predictions.jsonl").read_text(),
        }
    return out


def _table(report: Path) -> list[dict[str, str]]:
    with open(report / "table1.csv", newline="") as f:
        return list(csv.DictReader(f))


def _export_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "adapter_model.safetensors"))


def test_real_pipeline_with_requeue_and_killed_task_equals_the_direct_run(jobs, tmp_path):
    t0 = time.monotonic()
    ext = _built_torch_extensions()
    slurm_dir, direct_dir = tmp_path / "slurm", tmp_path / "direct"
    for d in (slurm_dir, direct_dir):
        d.mkdir()
        (d / "grid.yaml").write_text(GRID)
    stages = ("prep", "pretrain", "sweep", "adapt", "report")
    env = jobs.env(
        TPDS_CMD=f"{sys.executable} -m launch.cli",
        **{f"TPDS_{s.upper()}_CMD": "" for s in stages},
        **_env(TPDS_TORCH_EXT_SEED=str(ext), TPDS_SRUN_WAIT="120"),
    )
    prep_args = [a for arg in [*PREP_ARGS, "--out", str(slurm_dir / "data")] for a in ("--prep-arg", arg)]
    pretrain_args = [
        a
        for arg in [f"data.dir={slurm_dir / 'data'}", f"run.dir={slurm_dir / 'pretrain'}", *PRETRAIN_ARGS]
        for a in ("--pretrain-arg", arg)
    ]
    ids = _submit(
        jobs,
        slurm_dir,
        env,
        *prep_args,
        "--prep-cpus",
        "1",
        "--pretrain-config",
        str(TINY),
        *pretrain_args,
        "--nodes",
        "2",
        "--tasks-per-node",
        "1",
        "--cpus-per-task",
        "1",
        "--grid",
        "grid.yaml",
        "--sweep-out",
        "sweep",
        "--parallel",
        "2",
        "--adapt-cpus",
        "1",
        "--report-out",
        "report",
        "--report-arg",
        "--strict",
    )
    assert list(ids) == ["prep", "pretrain", "sweep", "report"]
    direct = DirectPipeline(direct_dir, ext)
    direct.start()
    try:
        slurm_s, stopped = _slurm_side(jobs, slurm_dir, env, ids)
        direct.result(600)
    finally:
        direct.stop()
    print(
        f"\n[real pipeline] Slurm pipeline done {slurm_s:.0f}s, both done {time.monotonic() - t0:.0f}s "
        f"after the start (pretrain stopped at step {stopped} of {STEPS})"
    )
    _assert_same_numbers(slurm_dir, direct_dir)


def _slurm_side(jobs, slurm_dir: Path, env: dict[str, str], ids: dict[str, str]) -> tuple[float, int]:
    """Inject the two failures, check the requeue and the recovery; (seconds to the final report, the step
    the pretrain stopped at)."""
    t0 = time.monotonic()

    # 1. the time-limit signal mid-run -> checkpoint, exit 124, requeue, resume
    metrics = slurm_dir / "pretrain" / "metrics.jsonl"
    _wait_while_running(
        jobs,
        ids["pretrain"],
        lambda: max(_train_steps(metrics), default=0) >= SIGNAL_AT,
        400,
        f"pretrain step {SIGNAL_AT}",
    )
    r = jobs.cluster.run(["scancel", "--signal=USR1", "--batch", ids["pretrain"]])
    assert r.returncode == 0, r.stderr

    # 2. SIGKILL one row's `adapt` while it runs
    table = slurm_dir / "sweep" / "jobs.jsonl"
    array_file = slurm_dir / "sweep" / "adapt_array.jobid"
    array = _wait_while_running(
        jobs,
        ids["sweep"],
        lambda: array_file.exists() and array_file.read_text().strip(),
        600,
        "the sweep job's adapt array",
    )
    jobs.track(array)
    killed_dir = Path(json.loads(table.read_text().splitlines()[KILLED_ROW])["job"]["out_dir"])
    killed_pid = _wait_while_running(
        jobs, f"{array}_{KILLED_ROW}", lambda: _kill_adapt_of(killed_dir), 300, f"row {KILLED_ROW}'s adapt process"
    )

    (report,) = jobs.wait(ids["report"], 600)
    assert report["JobState"] == "CANCELLED", (report, jobs.logs()[-6000:])  # afterok on a failed array
    states = {s["ArrayTaskId"]: s["JobState"] for s in jobs.show(array)}
    assert states == {"0": "FAILED", "1": "COMPLETED", "2": "COMPLETED", "3": "COMPLETED"}, states
    (pre,) = jobs.show(ids["pretrain"])
    assert pre["JobState"] == "COMPLETED" and pre["Restarts"] == "1", pre
    log = (slurm_dir / "logs" / f"tpds-pretrain-{ids['pretrain']}.out").read_text()
    (stopped,) = [
        int(line.split(" at step ")[1].split(":")[0])
        for line in log.splitlines()
        if "stop requested (SIGUSR1) at step" in line
    ]
    assert "exited with status 124" in log and f"requeuing job {ids['pretrain']} (restart 1)" in log, log[-4000:]
    resumed = [line for line in log.splitlines() if "[tensorpoly-ds] resumed from" in line]
    assert len(resumed) == 1 and resumed[0].endswith(f"/step_{stopped:08d} at step {stopped} on 2 rank(s)"), log[-4000:]
    steps = _train_steps(metrics)
    assert steps == list(range(1, STEPS + 1)), steps  # each step once: the second run began after `stopped`
    killed_log = (slurm_dir / "logs" / f"tpds-adapt-{array}_{KILLED_ROW}.out").read_text()
    assert f"exited with status {128 + signal.SIGKILL}" in killed_log, (killed_pid, killed_log[-3000:])

    # the documented recovery: resubmit the table (complete rows are skipped) and the report
    again = _submit(
        jobs,
        slurm_dir,
        env,
        "--table",
        "sweep/jobs.jsonl",
        "--parallel",
        "2",
        "--adapt-cpus",
        "1",
        "--report-out",
        "report",
        "--report-arg",
        "--strict",
    )
    assert list(again) == ["adapt", "report"]
    (report,) = jobs.wait(again["report"], 600)
    assert report["JobState"] == "COMPLETED", jobs.logs()[-6000:]
    for task in range(4):
        task_log = (slurm_dir / "logs" / f"tpds-adapt-{again['adapt']}_{task}.out").read_text()
        assert ("complete, skipped" in task_log) == (task != KILLED_ROW), (task, task_log[-2000:])
    return time.monotonic() - t0, stopped


def _assert_same_numbers(slurm_dir: Path, direct_dir: Path) -> None:
    import torch

    a, b = _export_tensors(slurm_dir / "pretrain"), _export_tensors(direct_dir / "pretrain")
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the requeued 2-node pretrain's export differs from the direct run's in {differ[:5]}"
    slurm_rows, direct_rows = _rows(slurm_dir / "sweep"), _rows(direct_dir / "sweep")
    assert len(slurm_rows) == 4 and slurm_rows.keys() == direct_rows.keys()
    for row, got in slurm_rows.items():
        assert got == direct_rows[row], row
    table_slurm, table_direct = _table(slurm_dir / "report"), _table(direct_dir / "report")
    assert table_slurm == table_direct
    cells = [c for c in table_slurm if c["task"] != "avg"]
    assert len(cells) == 2 and all(c["n"] == "2" for c in cells), table_slurm
