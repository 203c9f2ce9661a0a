"""Stop requests during adaptation: a stopped job is "requeue" (checkpoint in its folder, no COMPLETE, listed as
incomplete by the report) and its rerun resumes to exactly the result of an uninterrupted job. Folder locks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.manifest import read_manifest
from tensorpoly_ds.adapt import engine_train as engine_mod
from tensorpoly_ds.adapt import job as job_mod
from tensorpoly_ds.adapt.job import MARKER_FILE, RESULT_FILE, AdaptJob, JobBusy, JobError, is_complete, run_job
from tensorpoly_ds.adapt.local_train import CHECKPOINT_FILE
from tensorpoly_ds.adapt.report import collect
from tests.adapt.conftest import ROOT
from tests.lock_holder import held

FAST = dict(
    steps=6,
    batch_size=4,
    eval_every=2,
    eval_batch_size=8,
    max_eval_examples=12,
    warmup_ratio=0.0,
    mode="full",
    seed=1024,
)
COMPARED = ("evaluations", "final", "best", "per_template", "train_loss", "multitask_loss", "params", "k", "label")


def make_job(prepared, export, out, **kw):
    return AdaptJob(
        out_dir=str(out),
        data_dir=str(prepared),
        task=read_manifest(prepared).held_out[0],
        export=str(export),
        **{**FAST, **kw},
    )


def signal_at_call(monkeypatch, n, sig=signal.SIGTERM, losses=("tfew_losses",)):
    """Send `sig` to this process (a real signal through the installed handler) during the n-th loss call."""
    calls = [0]
    for name in losses:
        for mod in (job_mod, engine_mod):
            if hasattr(mod, name):
                original = getattr(mod, name)

                def wrapped(*a, _original=original, **k):
                    calls[0] += 1
                    if calls[0] == n:
                        os.kill(os.getpid(), sig)
                    return _original(*a, **k)

                monkeypatch.setattr(mod, name, wrapped)
    return calls


@pytest.mark.parametrize(
    "trainer,stop_call,sig",
    [("local", 3, signal.SIGTERM), ("engine", 4, signal.SIGUSR1), ("local", 2, signal.SIGINT)],
    ids=["local-sigterm-step3", "engine-sigusr1-step4", "local-sigint-multitask"],
)
def test_stopped_job_is_requeue_and_resumes_to_the_uninterrupted_result(
    prepared, poly_export, tmp_path, monkeypatch, trainer, stop_call, sig, tpds_messages
):
    extra = dict(trainer=trainer)
    losses = ("tfew_losses",)
    if sig == signal.SIGINT:  # stop inside the multi-task phase that precedes few-shot training
        extra.update(multitask_steps=3, multitask_batch_size=4, eval_at_start=True)
        losses = ("lm_loss",)
    reference = run_job(make_job(prepared, poly_export, tmp_path / "uninterrupted", **extra))
    assert reference["status"] == "complete"

    job = make_job(prepared, poly_export, tmp_path / "stopped", **extra)
    logs = tpds_messages  # the project logger's lines (tests/conftest.py)
    logs.clear()
    with monkeypatch.context() as m:
        signal_at_call(m, stop_call, sig, losses)
        stopped = run_job(job)
    out = Path(job.out_dir)
    assert stopped["status"] == "requeue" and stopped["signal"] == signal.Signals(sig).name
    phase = "multitask" if sig == signal.SIGINT else "fewshot"
    assert stopped["stopped"] == {"phase": phase, "step": stop_call}
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["status"] == "requeue" and not (out / MARKER_FILE).exists() and not is_complete(out)
    if trainer == "local":
        assert (out / CHECKPOINT_FILE).is_file()
    else:
        assert list((out / "engine" / phase / "checkpoints").glob("step_*/COMPLETE.json"))
    assert any("checkpoint kept" in line for line in logs)
    # the report lists it as incomplete, never as a result
    col = collect([tmp_path])
    assert [r["_dir"] for r in col.results] == [str(tmp_path / "uninterrupted")]
    (problem,) = col.problems
    assert (
        problem["state"] == "incomplete" and "stopped" in problem["detail"] and f"step {stop_call}" in problem["detail"]
    )

    logs.clear()
    resumed = run_job(job)
    assert any("resuming the run stopped at" in line for line in logs), logs
    assert resumed["status"] == "complete" and is_complete(out)
    assert not (out / CHECKPOINT_FILE).exists() and not list((out / "engine").rglob("checkpoints/step_*"))
    for key in COMPARED:
        assert resumed[key] == reference[key], key
    assert [e["step"] for e in resumed["evaluations"]] == ([0] if sig == signal.SIGINT else []) + [2, 4, 6]


def test_a_different_job_does_not_resume_another_jobs_checkpoint(prepared, poly_export, tmp_path, monkeypatch):
    job = make_job(prepared, poly_export, tmp_path / "j", trainer="local")
    with monkeypatch.context() as m:
        signal_at_call(m, 2)
        assert run_job(job)["status"] == "requeue"
    changed = make_job(prepared, poly_export, tmp_path / "j", trainer="local", lr=1e-2)
    with pytest.raises(JobError, match=r"stopped run of a different job \(lr: 0.003 then, 0.01 now\).*--force"):
        run_job(changed)
    assert json.loads((tmp_path / "j" / RESULT_FILE).read_text())["status"] == "requeue"  # state kept
    assert run_job(changed, force=True)["status"] == "complete"


def test_a_job_held_by_a_live_process_is_refused_and_a_dead_holder_releases_it(prepared, poly_export, tmp_path):
    job = make_job(prepared, poly_export, tmp_path / "held", trainer="local", steps=2, eval_every=0)
    with held(job.out_dir, "adaptation job") as holder:
        with pytest.raises(JobBusy, match=rf"in use by pid {holder.pid} on host .* since"):
            run_job(job)
        assert not (Path(job.out_dir) / RESULT_FILE).exists()
        # the CLI: exit 75 before anything is loaded
        proc = subprocess.run(
            [sys.executable, "-m", "launch.adapt", "--job", str(_job_file(job, tmp_path))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert proc.returncode == 75 and f"pid {holder.pid}" in proc.stderr, proc.stderr[-2000:]
    # the holder was killed (kill -9): the kernel dropped its lock; its holder file stays behind, stale
    assert (Path(job.out_dir) / ".tpds.lock.json").exists()
    assert run_job(job)["status"] == "complete"
    assert not (Path(job.out_dir) / ".tpds.lock.json").exists()


def _job_file(job, tmp_path) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job.to_dict()))
    return path


@pytest.mark.slow
def test_adapt_cli_sigterm_exits_124_and_rerun_resumes(prepared, poly_export, tmp_path):
    """The command line: SIGTERM mid-training -> exit 124, no COMPLETE; the same command resumes, exit 0."""
    job = make_job(
        prepared,
        poly_export,
        tmp_path / "cli",
        trainer="engine",
        steps=30,
        eval_every=0,
        max_eval_examples=4,
        eval_batch_size=4,
    )
    jfile = _job_file(job, tmp_path)
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )
    cmd = [sys.executable, "-m", "launch.adapt", "--job", str(jfile)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(job.out_dir) / "engine" / "fewshot" / "metrics.jsonl"  # one line per step, line-buffered
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 124, err[-3000:]
    saved = json.loads((Path(job.out_dir) / RESULT_FILE).read_text())
    assert saved["status"] == "requeue" and saved["signal"] == "SIGTERM" and 1 <= saved["stopped"]["step"] < 30
    assert not (Path(job.out_dir) / MARKER_FILE).exists() and "rerun to resume" in err
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert is_complete(job.out_dir) and "resumed from" in resumed.stdout + resumed.stderr
