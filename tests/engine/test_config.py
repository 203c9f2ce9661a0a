from pathlib import Path

import pytest
import yaml

from launch.cli import main as cli_main  # `tensorpoly-ds`: maps user errors to exit codes
from tensorpoly_ds.engine.config import RunConfigError, load_run_config, save_run_config
from tensorpoly_ds.engine.ds_config import fill_ds_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_named_with_its_file(tmp_path):
    base = write(tmp_path, "base.yaml", {"train": {"steps": 10}})
    bad = write(tmp_path, "method.yaml", {"train": {"stepz": 10}})
    with pytest.raises(RunConfigError) as err:
        load_run_config([base, bad])
    assert "train.stepz" in str(err.value) and "method.yaml" in str(err.value)
    with pytest.raises(RunConfigError, match=r"a\.yaml: unknown key 'adapter\.rnak'; valid keys in 'adapter': alpha,"):
        load_run_config([write(tmp_path, "a.yaml", {"adapter": {"rnak": 2}})])
    with pytest.raises(RunConfigError, match="unknown section 'trian'"):
        load_run_config([write(tmp_path, "s.yaml", {"trian": {}})])
    with pytest.raises(RunConfigError, match="override 'train.nope=1'"):
        load_run_config([base], ["train.nope=1"])


def test_wrong_types_named(tmp_path):
    with pytest.raises(RunConfigError, match=r"train\.steps.*expected an integer"):
        load_run_config([write(tmp_path, "a.yaml", {"train": {"steps": "many"}})])
    with pytest.raises(RunConfigError, match=r"adapter\.rank.*expected an integer"):
        load_run_config([], ["adapter.rank=1.5"])
    with pytest.raises(RunConfigError, match=r"train\.gradient_checkpointing.*true/false"):
        load_run_config([], ["train.gradient_checkpointing=3"])
    with pytest.raises(RunConfigError, match=r"adapter.*method"):
        load_run_config([], ["adapter.method=nope"])
    with pytest.raises(RunConfigError, match="optim.name"):
        load_run_config([], ["optim.name=sgd"])


def test_fp16_refused(tmp_path):
    with pytest.raises(RunConfigError, match="fp16 is refused"):
        load_run_config([], ["deepspeed.precision=fp16"])
    cfg = load_run_config([], ["deepspeed.overrides={fp16: {enabled: true}}"])
    with pytest.raises(RunConfigError, match="fp16"):
        fill_ds_config(cfg, 1)


def test_exponent_without_dot_is_a_number(tmp_path):
    base = write(tmp_path, "base.yaml", {"optim": {"module_lr": "1e-3"}})
    cfg = load_run_config([base], ["optim.lr=3e-3"])
    assert cfg.optim.lr == 3e-3 and cfg.optim.module_lr == 1e-3
    with pytest.raises(RunConfigError, match="'optim.lr' = 'fast'.*expected a number"):
        load_run_config([base], ["optim.lr=fast"])


def test_compose_and_overrides(tmp_path):
    base = write(
        tmp_path,
        "base.yaml",
        {
            "optim": {"name": "adafactor", "lr": 0.5},
            "adapter": {"method": "poly", "skills": 8},
            "deepspeed": {"overrides": {"zero_optimization": {"a": 1}}},
        },
    )
    method = write(
        tmp_path,
        "m.yaml",
        {"optim": {"lr": 0.25}, "adapter": {"skills": 4}, "deepspeed": {"overrides": {"zero_optimization": {"b": 2}}}},
    )
    cfg = load_run_config([base, method], ["optim.warmup_ratio=0.1", "train.steps=7", "adapter.rank=2"])
    assert cfg.optim.name == "adafactor" and cfg.optim.lr == 0.25 and cfg.optim.warmup_ratio == 0.1
    assert cfg.adapter.method == "poly" and cfg.adapter.skills == 4 and cfg.adapter.rank == 2
    assert cfg.train.steps == 7
    assert cfg.deepspeed.overrides == {"zero_optimization": {"a": 1, "b": 2}}
    # FullFT: adapter null replaces the mapping
    ft = load_run_config([base], ["adapter=null", "train.full_finetune=true"])
    assert ft.adapter is None and ft.train.full_finetune
    with pytest.raises(RunConfigError, match="full_finetune"):
        load_run_config([base], ["train.full_finetune=true"])
    # the resolved config round-trips
    saved = save_run_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_run_config([saved]) == cfg


def test_ds_config_filled_from_run_config():
    cfg = load_run_config(
        [],
        [
            "train.micro_batch=3",
            "train.grad_accum=5",
            "optim.clip=0.5",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
        ],
    )
    ds = fill_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and "offload_optimizer" in ds["zero_optimization"]
    for stage in (0, 1, 2):
        ds = fill_ds_config(load_run_config([], [f"deepspeed.zero_stage={stage}", "deepspeed.precision=fp32"]), 2)
        assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is False
    with pytest.raises(RunConfigError, match="offload_param"):
        load_run_config([], ["deepspeed.zero_stage=2", "deepspeed.offload_param=true"])


def test_shipped_configs_load():
    configs = sorted((REPO / "configs" / "pretrain").rglob("*.yaml"))
    assert configs
    base = REPO / "configs" / "pretrain" / "base_t0_3b.yaml"
    for path in configs:
        paths = [path] if path.name in ("base_t0_3b.yaml", "tiny_cpu.yaml") else [base, path]
        cfg = load_run_config(paths, ["data.dir=/x"])
        fill_ds_config(cfg, 8)


def test_bad_config_fails_before_any_expensive_work(tmp_path, monkeypatch):
    import tensorpoly_ds.engine.distributed as dist

    def boom():
        raise AssertionError("process group created before the config was validated")

    monkeypatch.setattr(dist, "init_distributed", boom)
    bad = write(tmp_path, "bad.yaml", {"train": {"stepz": 1}})
    assert cli_main(["pretrain", "--config", str(bad)]) == 2
    good = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"
    assert cli_main(["pretrain", "--config", str(good), f"data.dir={tmp_path / 'missing'}"]) == 2


def test_sigterm_and_sigusr1_set_the_stop_flag():
    import os
    import signal

    from tensorpoly_ds.engine.trainer import StopFlag

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        before = signal.getsignal(sig)
        flag = StopFlag()
        flag.install()
        os.kill(os.getpid(), sig)
        assert flag.signal == sig
        assert flag.install() is False  # idempotent: the launcher's early install is kept
        flag.restore()
        assert signal.getsignal(sig) == before


def _launched_as_rank0_of(monkeypatch, world: int) -> None:
    """The variables torchrun sets in each worker: the config checks must see the world size from them."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
        "TORCHELASTIC_RUN_ID": "t",
    }.items():
        monkeypatch.setenv(key, value)


class _Started(Exception):
    pass


def _no_process_group(monkeypatch):
    import tensorpoly_ds.engine.distributed as dist

    def started():
        raise _Started

    monkeypatch.setattr(dist, "init_distributed", started)


def test_train_batch_size_is_checked_against_the_launchers_world_size(tmp_path, monkeypatch, capsys, prepared_dir):
    """micro 4 x accum 4 x 2 ranks = 32: a correct train_batch_size is accepted, a wrong one refused (exit 2,
    the field and both values named) before any process group."""
    import launch.pretrain as pretrain

    _launched_as_rank0_of(monkeypatch, 2)
    _no_process_group(monkeypatch)
    args = [
        "--config",
        str(REPO / "configs" / "pretrain" / "tiny_cpu.yaml"),
        f"data.dir={prepared_dir}",
        f"run.dir={tmp_path / 'run'}",
        "train.micro_batch=4",
        "train.grad_accum=4",
    ]
    with pytest.raises(_Started):
        pretrain.main(args + ["deepspeed.overrides={train_batch_size: 32}"])
    assert cli_main(["pretrain", *args, "deepspeed.overrides={train_batch_size: 16}"]) == 2
    err = capsys.readouterr().err
    assert "'train_batch_size' = 16" in err and "(32)" in err


def test_bad_resume_is_refused_before_any_process_group(tmp_path, monkeypatch, capsys, prepared_dir):
    import json

    import launch.pretrain as pretrain

    _no_process_group(monkeypatch)
    run = tmp_path / "run"
    args = [
        "--config",
        str(REPO / "configs" / "pretrain" / "tiny_cpu.yaml"),
        f"data.dir={prepared_dir}",
        f"run.dir={run}",
    ]
    assert cli_main(["pretrain", *args, "--resume", "/no/such/tag"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert cli_main(["pretrain", *args, "--export-only"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    for step in (8, 16):  # every kept checkpoint truncated
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "meta.json").write_text("{}")
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
        (tag / "COMPLETE.json").write_text(json.dumps({"step": step, "files": {"mp_rank_00_model_states.pt": 100}}))
    assert cli_main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step_00000008: file mp_rank_00_model_states.pt has 10 bytes" in err
    assert "step_00000016" in err and "--resume none" in err
    with pytest.raises(_Started):  # starting over is the explicit choice
        pretrain.main(args + ["--resume", "none"])


def test_a_second_run_on_a_held_run_dir_is_refused(tmp_path, monkeypatch, capsys, prepared_dir):
    from tests.lock_holder import held

    _no_process_group(monkeypatch)
    run = tmp_path / "run"
    with held(run, "pretraining run directory") as holder:
        assert (
            cli_main(
                [
                    "pretrain",
                    "--config",
                    str(REPO / "configs" / "pretrain" / "tiny_cpu.yaml"),
                    f"data.dir={prepared_dir}",
                    f"run.dir={run}",
                ]
            )
            == 75
        )
    assert f"pretraining run directory {run} is in use by pid {holder.pid}" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [0, 1])
def test_a_checkpoint_error_in_the_run_is_reported_once_with_exit_2(rank, tmp_path, monkeypatch, capsys, prepared_dir):
    """A CheckpointError from the collective resume checks reaches every rank with the same verdict: each rank
    records exit 2 in its status file, rank 0 alone prints the one line; a bug records exit 1 and keeps its
    traceback. Mutations tried: the `rank != 0` early return removed (rank 1 prints the line too: fails);
    write_status with EXIT_FAILED for user errors (the status says 1: both ranks fail)."""
    import json

    import launch.pretrain as pretrain
    from tensorpoly_ds.engine.checkpoint import CheckpointError

    _launched_as_rank0_of(monkeypatch, 2)
    monkeypatch.setenv("RANK", str(rank))

    def verdict(*args, **kwargs):
        raise CheckpointError("step_00000008: model states have 10 bytes, 100 expected")

    monkeypatch.setattr(pretrain, "_run", verdict)
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--config",
        str(REPO / "configs" / "pretrain" / "tiny_cpu.yaml"),
        f"data.dir={prepared_dir}",
        f"run.dir={run}",
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    status = json.loads((run / "status" / f"rank{rank}.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 2 and "10 bytes" in status["error"]
    if rank == 0:
        assert err.strip() == "tensorpoly-ds pretrain: step_00000008: model states have 10 bytes, 100 expected"
    else:
        assert "10 bytes" not in err
    monkeypatch.setattr(pretrain, "_run", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli_main(args)
    assert json.loads((run / "status" / f"rank{rank}.json").read_text())["exit_code"] == 1
