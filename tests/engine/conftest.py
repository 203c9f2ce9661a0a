import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpds_common.net import free_port

REPO = Path(__file__).resolve().parents[2]
VOCAB = 130  # the embedded tokenizer of data_prep
PRETRAIN = REPO / "launch" / "pretrain.py"
TINY = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"
# A fixed, shared build cache for DeepSpeed's JIT op (the first build takes about a minute).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
os.environ["DS_ACCELERATOR"] = "cpu"


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
    """The real stage-1 output on the embedded mixture (16 tasks, 6400 train / 1600 val rows, ~3 s)."""
    out = tmp_path_factory.mktemp("data") / "embedded"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--mixture",
            "embedded",
            "--source",
            "embedded",
            "--tokenizer",
            "embedded",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    import torch
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.models import t5_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("backbone") / "tiny_t5"
    T5ForConditionalGeneration(t5_config("tiny", vocab_size=VOCAB)).save_pretrained(str(out))
    return out


def child_env(**extra) -> dict:
    env = dict(os.environ)
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_ID",
        "SLURM_JOB_ID",
    ):
        env.pop(key, None)
    env.update(
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pretrain_cmd(run_dir, prepared, overrides=(), nproc: int = 1, resume: str = "auto", configs=(TINY,)):
    args = (
        [str(PRETRAIN)]
        + [a for c in configs for a in ("--config", str(c))]
        + ["--resume", resume, f"data.dir={prepared}", f"run.dir={run_dir}", "train.progress_bar=false", *overrides]
    )
    if nproc == 1:
        return [sys.executable] + args
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
    ] + args


def run_pretrain(
    run_dir, prepared, overrides=(), nproc: int = 1, resume: str = "auto", timeout: int = 240, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        pretrain_cmd(run_dir, prepared, overrides, nproc, resume),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pretrain exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(run_dir, kind: str = "train", key: str = "train/loss") -> dict[int, float]:
    """step -> value; the last record of a step wins (a resumed run repeats steps after its checkpoint)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == kind and key in row:
            out[row["step"]] = row[key]
    return out


# The reference single-process run most integration tests compare against: ZeRO-0, 1 rank, micro 4 x accum 2.
# Routing heatmaps (~0.35 s of matplotlib each, plus its import) are drawn by the baseline only, where
# test_monitoring checks them; they change no number the other runs compare.
BASE_STEPS = 24
BASE = [
    "optim.name=adamw",
    "optim.warmup_ratio=0.25",
    "data.val_max_samples=45",
    f"train.steps={BASE_STEPS}",
    "train.micro_batch=4",
    "train.grad_accum=2",
    "train.save_every=8",
    "train.eval_every=8",
    "train.keep_checkpoints=3",
    "train.log_every=2",
    "train.heatmap_max_layers=0",
]
HEATMAPS = "train.heatmap_max_layers=2"  # tiny_cpu.yaml's setting
# TPDS_TEST_BATCHING=length_grouped reruns the multi-process equivalence, resume and elastic tests with
# length-grouped batching (groups of 3 steps: the step-8/16 checkpoints fall inside a group)
if os.environ.get("TPDS_TEST_BATCHING"):
    BASE += [f"data.batching={os.environ['TPDS_TEST_BATCHING']}", "data.group_size=3"]


def base_overrides(backbone, stage: int = 0, micro: int = 4) -> list[str]:
    return BASE + [f"model.name_or_path={backbone}", f"deepspeed.zero_stage={stage}", f"train.micro_batch={micro}"]


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, prepared_dir, backbone_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "baseline"
    run_pretrain(run_dir, prepared_dir, [*base_overrides(backbone_dir), HEATMAPS])
    return run_dir


ACCELERATE_ZERO2 = REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"


def accelerate_cmd(script_args, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_ZERO2),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        *script_args,
    ]


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory, prepared_dir, backbone_dir):
    """The baseline's training on 2 ranks x micro 2 under ZeRO `stage`: (run dir, its log: stderr), made on first
    use and shared (test_pretrain_runs compares it with the baseline, test_elastic_resume resumes it on 1
    rank). ZeRO-2 is launched by `accelerate launch` with the shipped DeepSpeed plugin config, which sets the
    stage (the run config says ZeRO-0; test_accelerate checks the plugin won); ZeRO-3 by torchrun."""
    runs = {}

    def get(stage: int):
        if stage not in runs:
            run_dir = tmp_path_factory.mktemp("runs") / f"two_ranks_z{stage}"
            if stage == 2:
                # pretrain_cmd's single-process form is [python, script, args...]: accelerate takes the rest
                args = pretrain_cmd(
                    run_dir, prepared_dir, [*BASE, f"model.name_or_path={backbone_dir}", "train.micro_batch=2"]
                )[1:]
                proc = subprocess.run(
                    accelerate_cmd(args), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600
                )
                assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            else:
                proc = run_pretrain(run_dir, prepared_dir, base_overrides(backbone_dir, stage=stage, micro=2), nproc=2)
            runs[stage] = run_dir, proc.stderr  # log lines go to stderr (tpds_common.log)
        return runs[stage]

    return get
