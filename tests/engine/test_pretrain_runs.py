"""End-to-end runs of launch/pretrain.py as subprocesses (1 process, and 2 ranks under torchrun)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.processes import alive

from .conftest import BASE_STEPS, REPO, base_overrides, child_env, pretrain_cmd, read_metrics, run_pretrain

pytestmark = pytest.mark.slow
REL = 1e-5  # fp32 on CPU: only the summation order differs between layouts


def assert_same_trajectory(a: dict, b: dict, rel: float = REL):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= rel * max(1.0, abs(a[step])), (step, a[step], b[step])


def test_single_process_tiny_run_lowers_loss(baseline_run):
    losses = read_metrics(baseline_run)
    assert sorted(losses) == list(range(1, BASE_STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < 0.8 * first, (first, last)
    val = read_metrics(baseline_run, "eval", "val/loss")
    assert sorted(val) == [8, 16, 24] and val[24] < val[8]
    for name in ("config.yaml", "ds_config.json", "export/adapter_model.safetensors", "export/adapter_config.json"):
        assert (baseline_run / name).is_file(), name
    tags = sorted(p.name for p in (baseline_run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000008", "step_00000016", "step_00000024"]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank(stage, tmp_path, prepared_dir, backbone_dir, baseline_run, two_rank_run):
    """2 ranks x micro 2 (ZeRO-2 / ZeRO-3, the backbone loaded under zero.Init) == 1 rank x micro 4 (ZeRO-0)."""
    run_dir, stdout = two_rank_run(stage)
    if stage == 3:  # the pretrained backbone was loaded under deepspeed.zero.Init (HfDeepSpeedConfig alive)
        assert "backbone partitioned at load (zero.Init): True" in stdout, stdout[-2000:]
    assert_same_trajectory(read_metrics(baseline_run), read_metrics(run_dir))
    assert_same_trajectory(read_metrics(baseline_run, "eval", "val/loss"), read_metrics(run_dir, "eval", "val/loss"))
    # adapter health is all-reduced over ranks: the gradient norms (read from ZeRO-2 fragments / ZeRO-3
    # partitions) equal the 1-rank run's; the delta ratios, which count padded positions, equal those of the
    # same batch layout under the other ZeRO stage (micro 2 pads differently from the baseline's micro 4:
    # ~4 % apart). Mutation: no all-reduce in AdapterHealth.metrics -> rank 0's half of the partitions.
    for key in ("train/adapter_grad_norm/modules", "train/adapter_grad_norm/routing"):
        assert_same_trajectory(read_metrics(baseline_run, key=key), read_metrics(run_dir, key=key))
    if stage == 3:
        for key in ("train/delta_ratio/mean", "train/delta_ratio/decoder_cross_attention"):
            assert_same_trajectory(read_metrics(two_rank_run(2)[0], key=key), read_metrics(run_dir, key=key))
    if stage == 3:
        # resume a ZeRO-3 run (partitioned model and optimizer states) from its step-16 checkpoint
        resumed = tmp_path / "z3_resumed"
        shutil.copytree(run_dir / "checkpoints", resumed / "checkpoints")
        shutil.rmtree(resumed / "checkpoints" / "step_00000024")
        proc = run_pretrain(resumed, prepared_dir, base_overrides(backbone_dir, stage=stage, micro=2), nproc=2)
        assert "resumed from" in proc.stderr and "step_00000016" in proc.stderr
        losses = read_metrics(resumed)
        assert sorted(losses) == list(range(17, BASE_STEPS + 1))
        assert_same_trajectory({s: v for s, v in read_metrics(run_dir).items() if s > 16}, losses, rel=1e-6)
    # the export does not depend on the world size or the ZeRO stage
    from safetensors.torch import load_file

    a = load_file(str(baseline_run / "export" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "export" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    # AdamW divides by sqrt(v): float-summation noise in near-zero routing gradients (lr 0.1) moves single
    # logits by ~1e-4 while the losses agree to 1e-5
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=3e-4, msg=lambda m, k=k: f"{k}: {m}")


def run_and_signal(cmd, run_dir, after_steps: int, timeout: float = 240):
    """Run `cmd`, send it SIGUSR1 once `after_steps` training steps are logged; (proc, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= after_steps:
                proc.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, out, err


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, prepared_dir, backbone_dir):
    """A run sent SIGUSR1 after a few steps (returns its exit status), then resumed with --resume auto."""
    run_dir = tmp_path_factory.mktemp("runs") / "interrupted"
    proc, out, err = run_and_signal(pretrain_cmd(run_dir, prepared_dir, base_overrides(backbone_dir)), run_dir, 5)
    stopped = dict(read_metrics(run_dir))
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    resumed = run_pretrain(run_dir, prepared_dir, base_overrides(backbone_dir))
    return {
        "run_dir": run_dir,
        "returncode": proc.returncode,
        "stdout": out,
        "stderr": err,
        "stopped": stopped,
        "tags": tags,
        "resumed": resumed,
    }


def test_sigusr1_checkpoints_and_exits_with_requeue_status(interrupted_run):
    from tensorpoly_ds.engine.trainer import REQUEUE_EXIT_CODE

    r = interrupted_run
    assert r["returncode"] == REQUEUE_EXIT_CODE, r["stderr"][-3000:]
    last = max(r["stopped"])
    assert 5 <= last < BASE_STEPS
    tag = f"step_{last:08d}"
    assert tag in r["tags"], r["tags"]
    assert "SIGUSR1" in r["stderr"]  # the stop line, logged (stderr)


def test_resume_reproduces_the_uninterrupted_run(interrupted_run, baseline_run):
    r = interrupted_run
    assert "resumed from" in r["resumed"].stderr
    assert_same_trajectory(read_metrics(baseline_run), read_metrics(r["run_dir"]), rel=1e-6)
    assert_same_trajectory(
        read_metrics(baseline_run, "eval", "val/loss"), read_metrics(r["run_dir"], "eval", "val/loss"), rel=1e-6
    )


def test_corrupt_checkpoints_fall_back_by_name(tmp_path, prepared_dir, backbone_dir, baseline_run):
    """step 24: 4 KiB zeroed inside a file, size unchanged (its checksum catches it); step 16: a file that was
    already unreadable when its checksum was taken (DeepSpeed's load fails: named fallback). Resume auto
    warns about both by file name and continues from step 8 exactly as the uninterrupted run did."""
    from tensorpoly_ds.engine import checkpoint as ckpt

    run_dir = tmp_path / "corrupt"
    shutil.copytree(baseline_run / "checkpoints", run_dir / "checkpoints")
    victim = run_dir / "checkpoints" / "step_00000024" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    victim.write_bytes(bytes(data))
    unreadable = run_dir / "checkpoints" / "step_00000016" / "mp_rank_00_model_states.pt"
    data = bytearray(unreadable.read_bytes())
    data[-300:] = bytes(300)  # the zip's central directory: "PytorchStreamReader failed reading zip archive"
    unreadable.write_bytes(bytes(data))
    ckpt.write_marker(unreadable.parent, 16)  # checksums taken over the broken file
    proc = run_pretrain(run_dir, prepared_dir, base_overrides(backbone_dir))
    assert "step_00000024" in proc.stderr and "mp_rank_00_model_states.pt: content differs" in proc.stderr
    assert "step_00000016 is unreadable (mp_rank_00_model_states.pt" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_00000008" in proc.stderr
    losses = read_metrics(run_dir)
    assert sorted(losses) == list(range(9, BASE_STEPS + 1))
    base = read_metrics(baseline_run)
    assert_same_trajectory({s: base[s] for s in losses}, losses, rel=1e-6)


def test_torchrun_stop_exits_124_through_the_wrapper(tmp_path, prepared_dir, backbone_dir):
    """torchrun turns a rank's 124 into its own 1; `python -m launch.torchrun` (same arguments) forwards
    SIGUSR1 to the ranks, reads their status files and exits 124."""
    from tensorpoly_ds.engine.checkpoint import list_tags, verify_tag
    from tensorpoly_ds.engine.rank_status import read_statuses
    from tpds_common.net import free_port

    from .conftest import PRETRAIN, TINY

    run_dir = tmp_path / "torchrun"
    overrides = base_overrides(backbone_dir, stage=2, micro=2) + [
        "train.steps=5000",
        "train.save_every=0",
        "train.eval_every=0",
    ]
    cmd = [
        sys.executable,
        "-m",
        "launch.torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(PRETRAIN),
        "--config",
        str(TINY),
        f"data.dir={prepared_dir}",
        f"run.dir={run_dir}",
        "train.progress_bar=false",
        *overrides,
    ]
    proc, out, err = run_and_signal(cmd, run_dir, 3)
    assert proc.returncode == 124, err[-4000:]
    assert "torchrun exited 1; every rank checkpointed" in err
    statuses = read_statuses(run_dir / "status")
    assert sorted(statuses) == [0, 1] and {s["status"] for s in statuses.values()} == {"requeue"}
    assert {s["exit_code"] for s in statuses.values()} == {124} and statuses[0]["step"] < 5000
    (tag,) = [p for _, p in list_tags(run_dir / "checkpoints")]
    assert tag.name == f"step_{statuses[0]['step']:08d}" and verify_tag(tag) is None


def test_srun_style_two_ranks_zero1_match_one_rank(tmp_path, prepared_dir, backbone_dir, baseline_run):
    """Two plain python processes with only Slurm's variables (as `srun --ntasks 2` starts them)."""
    from tpds_common.net import free_port

    run_dir = tmp_path / "srun"
    cmd = pretrain_cmd(run_dir, prepared_dir, base_overrides(backbone_dir, stage=1, micro=2))
    port = free_port()
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env(
                SLURM_PROCID=r,
                SLURM_LOCALID=r,
                SLURM_NTASKS=2,
                SLURM_STEP_ID=0,
                SLURM_JOB_ID=4242,
                SLURM_JOB_NODELIST="localhost",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert_same_trajectory(read_metrics(baseline_run), read_metrics(run_dir))
    ds = __import__("json").loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["train_batch_size"] == 8


def test_time_budget_checkpoints_and_requeues(tmp_path, prepared_dir, backbone_dir):
    from tensorpoly_ds.engine.checkpoint import verify_tag
    from tensorpoly_ds.engine.trainer import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "budget"
    # the default tiny architecture of tiny_cpu.yaml (random init, vocab from the manifest)
    overrides = [o for o in base_overrides(backbone_dir) if not o.startswith("model.")]
    proc = run_pretrain(run_dir, prepared_dir, overrides + ["train.max_minutes=0.0001"], check=False)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-3000:]
    assert "time budget" in proc.stderr
    assert verify_tag(run_dir / "checkpoints" / "step_00000001") is None
    assert not (run_dir / "export").exists()


def test_export_on_request_equals_the_end_of_run_export(tmp_path, prepared_dir, backbone_dir, baseline_run):
    run_dir = tmp_path / "export_only"
    shutil.copytree(baseline_run / "checkpoints", run_dir / "checkpoints")
    proc = subprocess.run(
        pretrain_cmd(run_dir, prepared_dir, base_overrides(backbone_dir)) + ["--export-only"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = (baseline_run / "export" / "adapter_model.safetensors").read_bytes()
    b = (run_dir / "export" / "adapter_model.safetensors").read_bytes()
    assert a == b
    assert not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir)


def _bf16_took_effect(ds, eng):
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert eng["bf16_enabled"] and eng["optimizer"] == "DeepSpeedZeroOptimizer"
    assert eng["inner_optimizer"] == "Adafactor"
    # the engine computes in bf16 (weights and the logits of a training forward), the master copy stays fp32
    assert eng["param_dtypes"] == ["bfloat16"] and eng["activation_dtype"] == "bfloat16"
    assert eng["master_weights"]["dtypes"] == ["float32"]
    assert not eng["offload_optimizer"]


def _offload_took_effect(ds, eng):
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # on the CPU accelerator every tensor is on the CPU anyway: what shows offload is ZeRO-3's own state
    assert eng["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert eng["offload_optimizer"] and eng["offload_param"]
    assert eng["master_weights"]["devices"] == ["cpu"] and eng["optimizer_state"]["devices"] == ["cpu"]
    assert eng["activation_dtype"] == "float32" and not eng["bf16_enabled"]


@pytest.mark.parametrize(
    "extra,check",
    [
        (["deepspeed.precision=bf16", "deepspeed.zero_stage=2", "optim.name=adafactor"], _bf16_took_effect),
        (
            ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"],
            _offload_took_effect,
        ),
    ],
    ids=["bf16-zero2-adafactor", "zero3-offload"],
)
def test_precision_and_offload_variants_run(extra, check, tmp_path, prepared_dir):
    """The run records what the engine did (RUN_DIR/engine.json, engine/effective.py), not only what it was
    asked. Mutations seen caught: the trainer passing ds_initialize a copy of the config without
    offload_optimizer/offload_param (zero3-offload fails: offload_optimizer False), and with bf16 disabled
    (bf16 case fails: param dtypes float32)."""
    import json
    import math

    run_dir = tmp_path / "variant"
    run_pretrain(run_dir, prepared_dir, ["train.steps=4", "train.eval_every=2", "data.val_max_samples=20", *extra])
    losses = read_metrics(run_dir)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    check(json.loads((run_dir / "ds_config.json").read_text()), json.loads((run_dir / "engine.json").read_text()))
    # adapter health reads bf16-optimizer fragments and offloaded ZeRO-3 partitions (Poly: B = 0 at step 1,
    # its A still gets gradient)
    grads = read_metrics(run_dir, key="train/adapter_grad_norm/modules")
    assert sorted(grads) == [1, 2, 3, 4] and all(math.isfinite(v) and v > 0 for v in grads.values())
    assert all(math.isfinite(v) for v in read_metrics(run_dir, key="train/delta_ratio/mean").values())


def test_fullft_export_only_keeps_tied_embeddings_where_zero_to_fp32_safetensors_fails(tmp_path, prepared_dir):
    """T5 ties shared.weight to the encoder/decoder embeddings (and, with transformers 5, the LM head of a
    config-built backbone): DeepSpeed's zero_to_fp32 --safe_serialization refuses such a checkpoint ("share
    memory") and writes nothing. `pretrain --export-only` writes safetensors that reload to the same model."""
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    run_dir = tmp_path / "fullft"
    overrides = [
        "adapter=null",
        "train.full_finetune=true",
        "deepspeed.zero_stage=2",
        "train.steps=3",
        "train.save_every=0",
        "train.eval_every=0",
        "train.micro_batch=2",
        "train.grad_accum=1",
    ]
    run_pretrain(run_dir, prepared_dir, overrides)
    ckpt_dir = run_dir / "checkpoints"
    z2f = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.utils.zero_to_fp32",
            str(ckpt_dir),
            str(tmp_path / "z2f"),
            "--safe_serialization",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert z2f.returncode != 0 and "share memory" in z2f.stderr, z2f.stderr[-2000:]
    assert not (tmp_path / "z2f" / "model.safetensors").exists()

    end_of_run = load_file(str(run_dir / "export" / "model.safetensors"))
    shutil.rmtree(run_dir / "export")
    proc = subprocess.run(
        pretrain_cmd(run_dir, prepared_dir, overrides) + ["--export-only"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    assert exported.keys() == end_of_run.keys() and all(torch.equal(exported[k], end_of_run[k]) for k in exported)
    model = T5ForConditionalGeneration.from_pretrained(str(run_dir / "export"))
    shared = model.shared.weight
    assert model.encoder.embed_tokens.weight is shared and model.decoder.embed_tokens.weight is shared
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in exported.items())  # reloads to the trained weights


def test_a_run_of_a_pool_checkpoints_and_stops_when_the_pool_is_killed(tmp_path, prepared_dir, backbone_dir):
    """A pool (replicate, lr-search) starts each run with TPDS_PARENT_PID; kill -9 of the pool leaves no run
    training on: the run gets SIGTERM from the kernel, checkpoints and exits with the requeue status."""
    from tensorpoly_ds.engine.job_env import PARENT_PID_ENV

    run_dir = tmp_path / "orphan"
    cmd = pretrain_cmd(run_dir, prepared_dir, [*base_overrides(backbone_dir), "train.steps=100000"])
    stderr = tmp_path / "run.err"
    # the stand-in pool: starts the run as its child with its own pid in the variable, then waits forever
    pool_code = (
        "import os, subprocess, sys, time\n"
        f"env = dict(os.environ, {PARENT_PID_ENV}=str(os.getpid()))\n"
        f"child = subprocess.Popen({cmd!r}, cwd={str(REPO)!r}, env=env, stderr=open({str(stderr)!r}, 'w'))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    pool = subprocess.Popen(
        [sys.executable, "-c", pool_code], cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True
    )
    run_pid = int(pool.stdout.readline())
    try:
        deadline = time.monotonic() + 240
        while not ((run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3):
            assert time.monotonic() < deadline and pool.poll() is None, "the run never trained"
            time.sleep(0.05)
        pool.kill()
        pool.wait()
        deadline = time.monotonic() + 120
        while alive(run_pid):
            assert time.monotonic() < deadline, "the run kept training after its pool was killed"
            time.sleep(0.1)
    finally:
        for pid in (pool.pid, run_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    last = max(read_metrics(run_dir))
    assert last < 100000
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert f"step_{last:08d}" in tags, (last, tags)  # stopped the orderly way: a checkpoint at its last step
    assert "SIGTERM" in stderr.read_text()
