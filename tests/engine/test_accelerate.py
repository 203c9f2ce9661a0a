"""`accelerate launch` with the DeepSpeed plugin config shipped in configs/accelerate/: its settings map to
run-config overrides, and pretraining on 2 CPU ranks under it trains exactly like 1 rank (the reference run)."""

import json

import pytest

from tensorpoly_ds.adapt.spec import launcher_job_fields
from tensorpoly_ds.engine.distributed import LaunchError, accelerate_overrides, distributed_env

from .conftest import read_metrics
from .test_pretrain_runs import assert_same_trajectory


def plugin_env(**extra):
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_MIXED_PRECISION": "no",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "none",
    }
    env.update(extra)
    return env


def test_plugin_settings_become_run_config_overrides():
    assert accelerate_overrides({}) == [] and accelerate_overrides({"RANK": "0"}) == []
    assert accelerate_overrides(plugin_env()) == [
        "deepspeed.zero_stage=2",
        "deepspeed.offload_optimizer=false",
        "deepspeed.offload_param=false",
    ]
    env = plugin_env(
        ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
        ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu",
        ACCELERATE_MIXED_PRECISION="bf16",
        ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4",
        ACCELERATE_GRADIENT_CLIPPING="0.5",
    )
    assert accelerate_overrides(env) == [
        "deepspeed.zero_stage=3",
        "deepspeed.offload_optimizer=true",
        "deepspeed.offload_param=false",
        "deepspeed.precision=bf16",
        "train.grad_accum=4",
        "optim.clip=0.5",
    ]
    out = distributed_env(plugin_env())
    assert (out["LAUNCHER"], out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("accelerate", "1", "2", "1")


def test_plugin_deepspeed_config_file_is_the_template(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    env = plugin_env(ACCELERATE_DEEPSPEED_CONFIG_FILE=str(path))
    del env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
    assert accelerate_overrides(env)[:2] == [f"deepspeed.template={path}", "deepspeed.zero_stage=3"]


@pytest.mark.parametrize(
    "var, value, needle",
    [
        ("ACCELERATE_MIXED_PRECISION", "fp16", "ACCELERATE_MIXED_PRECISION=fp16"),
        ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE=nvme"),
    ],
)
def test_unsupported_plugin_settings_are_refused(var, value, needle):
    with pytest.raises(LaunchError, match=needle):
        accelerate_overrides(plugin_env(**{var: value}))


def test_adaptation_jobs_take_the_stage_and_precision():
    assert launcher_job_fields({}) == {}
    assert launcher_job_fields(plugin_env(ACCELERATE_MIXED_PRECISION="bf16")) == {
        "trainer": "engine",
        "zero_stage": 2,
        "precision": "bf16",
    }
    with pytest.raises(LaunchError, match="offload"):
        launcher_job_fields(plugin_env(ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu"))


@pytest.mark.slow
def test_accelerate_launch_two_ranks_match_one_rank(baseline_run, two_rank_run):
    """accelerate launch (DeepSpeed plugin, ZeRO-2) x 2 CPU ranks x micro 2 == 1 rank x micro 4 (ZeRO-0): the
    plugin's stage is used (the run config says ZeRO-0) and the losses follow the reference run. The run is
    the session's 2-rank ZeRO-2 twin (conftest.two_rank_run), which test_pretrain_runs and the elastic tests
    use too."""
    run_dir, stdout = two_rank_run(2)
    assert "accelerate launch: deepspeed.zero_stage=2" in stdout, stdout[-3000:]
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 2 * 2 * 2
    assert_same_trajectory(read_metrics(baseline_run), read_metrics(run_dir))
