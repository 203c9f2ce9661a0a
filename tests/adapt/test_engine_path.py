"""Adaptation through the stage-2 engine (DeepSpeed): one rank, and two ranks under ZeRO-3 via torchrun.
Never skipped: the engine is part of this tree and DeepSpeed a required dependency, so an engine that does
not import is an error (engine_available raises JobError, see test_job.py), not a reason to skip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.manifest import read_manifest
from tensorpoly_ds.adapt.job import is_complete
from tests.adapt.conftest import ROOT
from tpds_common.net import free_port


def adapt_args(prepared, export, out, mode, zero):
    task = read_manifest(prepared).held_out[0]
    return [
        "-m",
        "launch.adapt",
        "--export",
        str(export),
        "--data",
        str(prepared),
        "--task",
        task,
        "--mode",
        mode,
        "--seed",
        "0",
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--set",
        "max_eval_examples=12",
        "--set",
        "eval_batch_size=4",
        "--set",
        'trainer="engine"',
        "--set",
        f"zero_stage={zero}",
        "--set",
        "save_adapter=true",
        "--set",
        "warmup_ratio=0.0",
    ]


def env():
    port = free_port()
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONPATH=str(ROOT),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    ), port


def launch(args: list[str], ranks: int | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS` (ranks None) or `torchrun --nproc_per_node RANKS ARGS` on a free port; must exit 0."""
    e, port = env()
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]
    launcher = [] if ranks is None else torchrun
    proc = subprocess.run(
        [sys.executable, *launcher, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def check_z(out, export):
    result = json.loads((out / "result.json").read_text())
    assert is_complete(out) and result["trainer"] == "engine"
    assert [e["step"] for e in result["evaluations"]] == [2, 4] and result["evaluations"][-1]["examples"] == 12
    pre = load_file(str(Path(export) / "adapter_model.safetensors"))
    post = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k, v in pre.items():
        if not k.startswith("tpds_routing."):
            assert torch.equal(v, post[k]), f"mode z changed module tensor {k}"
    logits = torch.cat(
        [v.flatten() for k, v in load_file(str(out / "routing.safetensors")).items() if k.endswith(".logits")]
    )
    assert logits.abs().max() > 2e-3
    # routing is monitored by its entropy; a one-task job draws no heatmaps (engine_train: heatmap_max_layers=0)
    rows = [json.loads(line) for line in (out / "engine" / "fewshot" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "routing"] == [2, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "engine" / "fewshot" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "routing_entropy/mean" in acc.Tags()["scalars"] and acc.Tags()["images"] == []
    return result


@pytest.mark.slow
def test_engine_one_rank_and_zero3_two_ranks(prepared, poly_export, tmp_path):
    launch(adapt_args(prepared, poly_export, tmp_path / "one", "z", 0))
    r1 = check_z(tmp_path / "one", poly_export)
    assert r1["world_size"] == 1
    two = launch(adapt_args(prepared, poly_export, tmp_path / "two", "z", 3), ranks=2)
    r2 = check_z(tmp_path / "two", poly_export)
    assert r2["world_size"] == 2
    assert two.stdout.count('"final"') == 1, "only rank 0 prints the result line"


def test_tiny_backbone_is_the_one_stage2_builds():
    """Adapting a tiny export is only meaningful on the pretraining backbone: same weights, bit for bit."""
    from tensorpoly_ds.adapt.job import AdaptJob, build_backbone
    from tensorpoly_ds.engine.checkpoint import seed_all
    from tensorpoly_ds.engine.config import ModelSection
    from tensorpoly_ds.engine.model import build_backbone as engine_build

    seed_all(42)  # what `tensorpoly-ds pretrain` does with the default train.seed before building
    ref, _ = engine_build(ModelSection(name_or_path="tiny"), vocab_size=130, ds_config=None, precision="fp32")
    ours = build_backbone(AdaptJob(out_dir="x", data_dir="x", task="t", method="fullft"), 130)
    a, b = ref.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_zero3_hf_checkpoint_backbone_two_ranks(prepared, tmp_path):
    """A backbone given as a HF directory is loaded into ZeRO-3 partitions (zero.Init); parameter counts
    still see the full sizes and the adapted export is complete."""
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.adapt.job import AdaptJob, build_backbone
    from tests.adapt.conftest import make_export

    vocab = read_manifest(prepared).tokenizer["vocab_size"]
    backbone = build_backbone(AdaptJob(out_dir="x", data_dir="x", task="t", method="fullft"), vocab)
    backbone.save_pretrained(str(tmp_path / "hf"))
    export = make_export(prepared, tmp_path / "export", "poly", skills=2)  # same weights as tmp_path/hf
    launch(adapt_args(prepared, export, tmp_path / "job", "full", 3) + ["--model", str(tmp_path / "hf")], ranks=2)
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    assert result["world_size"] == 2 and result["status"] == "complete"
    assert result["params"]["backbone"] == sum(
        p.numel() for p in T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).parameters()
    )
    assert result["params"]["trainable"] == result["params"]["multi_task"]["modules"] + 2 * len(
        [k for k in load_file(str(tmp_path / "job" / "routing.safetensors")) if k.endswith(".logits")]
    )
    post = load_file(str(tmp_path / "job" / "adapter" / "adapter_model.safetensors"))
    pre = load_file(str(Path(export) / "adapter_model.safetensors"))
    changed = [k for k, v in pre.items() if not k.startswith("tpds_routing.") and not torch.equal(v, post[k])]
    assert changed and all(post[k].numel() == pre[k].numel() for k in changed)
    # zero-shot (k = 0) under ZeRO-3: no training, evaluation still through the partitioned engine
    args = adapt_args(prepared, export, tmp_path / "zs", "mu", 3) + ["--model", str(tmp_path / "hf"), "--k", "0"]
    launch(args, ranks=2)
    zs = json.loads((tmp_path / "zs" / "result.json").read_text())
    assert zs["zero_shot"] and [x["step"] for x in zs["evaluations"]] == [0] and zs["evaluations"][0]["examples"] == 12


@pytest.mark.slow
def test_chunked_job_two_ranks_equals_one_rank(prepared, poly_export, tmp_path):
    """chunk_tokens under data parallelism (ZeRO-2, 2 ranks, each rank's micro-batch chunked on its own) ends
    where one rank does: the same evaluations and predictions, losses within float32 noise."""
    chunked = ["--set", "chunk_tokens=48"]
    results = {}
    for name, world in (("one", 1), ("two", 2)):
        launch(adapt_args(prepared, poly_export, tmp_path / name, "full", 2) + chunked, ranks=world)
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
        assert results[name]["world_size"] == world and results[name]["job"]["chunk_tokens"] == 48
    one, two = results["one"], results["two"]
    assert [(e["step"], e["accuracy"]) for e in two["evaluations"]] == [
        (e["step"], e["accuracy"]) for e in one["evaluations"]
    ]
    for a, b in zip(two["train_loss"], one["train_loss"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    lines = {n: (tmp_path / n / "predictions.jsonl").read_text().splitlines() for n in results}
    margins = [sorted(s)[1] - sorted(s)[0] for s in (json.loads(x)["scores"] for x in lines["one"])]
    assert min(margins) > 1e-3, "fixture: a near tie would make the prediction depend on float noise"
    assert [json.loads(x)["prediction"] for x in lines["two"]] == [json.loads(x)["prediction"] for x in lines["one"]]
