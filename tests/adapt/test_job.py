"""Adaptation jobs end to end on a tiny prepared directory: modes, weights, skip/rerun, zero-shot."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.manifest import read_manifest
from tensorpoly_ds.adapt import job as job_mod
from tensorpoly_ds.adapt.job import MARKER_FILE, RESULT_FILE, AdaptJob, JobError, is_complete, run_job
from tensorpoly_ds.adapters import ModeError
from tests.adapt.conftest import make_export

FAST = dict(steps=4, batch_size=4, eval_every=2, eval_batch_size=8, max_eval_examples=12, warmup_ratio=0.0)


def make_job(prepared, out, **kw):
    task = read_manifest(prepared).held_out[0]
    return AdaptJob(out_dir=str(out), data_dir=str(prepared), task=task, **{**FAST, **kw})


def split_tensors(path):
    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    modules = {k: v for k, v in state.items() if not k.startswith("tpds_routing.")}
    routing = {k: v for k, v in state.items() if k.startswith("tpds_routing.") and k.endswith(".logits")}
    return modules, routing


@pytest.mark.parametrize("mode,trainer", [("full", "auto"), ("z", "auto"), ("mu", "auto"), ("z", "local")])
def test_modes_end_to_end_and_weights(prepared, poly_export, tmp_path, mode, trainer):
    """trainer auto = the engine (DeepSpeed): this tree has it, so auto must not run the local loop.
    Mutation seen caught: engine_available() returning False (auto fell back silently): result trainer 'local'."""
    job = make_job(prepared, tmp_path / mode, export=str(poly_export), mode=mode, save_adapter=True, trainer=trainer)
    result = run_job(job)
    assert result["status"] == "complete" and is_complete(job.out_dir)
    assert result["trainer"] == ("engine" if trainer == "auto" else trainer)
    saved = json.loads((tmp_path / mode / RESULT_FILE).read_text())
    assert saved["final"] == result["final"]
    assert [e["step"] for e in saved["evaluations"]] == [2, 4]
    assert saved["final"]["step"] == 4 and 0.0 <= saved["final"]["accuracy"] <= 1.0
    assert saved["best"]["accuracy"] == max(e["accuracy"] for e in saved["evaluations"])
    assert saved["per_template"] and all(0 <= v <= 1 for v in saved["per_template"].values())
    preds = [json.loads(line) for line in (tmp_path / mode / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(len(p["scores"]) >= 1 for p in preds)
    assert sum(p["correct"] for p in preds) / 12 == pytest.approx(saved["final"]["accuracy"])
    pre_modules, _ = split_tensors(poly_export)
    post_modules, post_routing = split_tensors(tmp_path / mode / "adapter")
    assert set(pre_modules) == set(post_modules)
    changed = [k for k in pre_modules if not torch.equal(pre_modules[k], post_modules[k])]
    routing = load_file(str(tmp_path / mode / "routing.safetensors"))
    weights = [v for k, v in routing.items() if k.endswith(".weights")]
    logits = torch.cat([v.flatten() for k, v in routing.items() if k.endswith(".logits")])
    n_tables = len(post_routing)
    if mode == "z":
        assert changed == [], "mode z must not change module parameters"
        assert logits.abs().max() > 2e-3, "routing logits should have moved away from their U(+-1e-3) init"
        assert saved["params"]["trainable"] == n_tables * 3
    elif mode == "mu":
        assert len(changed) == len(pre_modules), "mode mu trains every module"
        assert logits.abs().max() <= 1e-3, "mu keeps the routing fixed (logits untouched at init)"
        for w in weights:
            torch.testing.assert_close(w, torch.full_like(w, 1 / 3))
        assert saved["params"]["trainable"] == saved["params"]["multi_task"]["modules"]
    else:
        assert len(changed) == len(pre_modules)
        assert logits.abs().max() > 2e-3
        assert saved["params"]["trainable"] == saved["params"]["multi_task"]["modules"] + n_tables * 3


def test_skip_if_complete_and_rerun_if_crashed(prepared, poly_export, tmp_path, monkeypatch, tpds_messages):
    logs = tpds_messages  # the project logger's lines (tests/conftest.py)
    logs.clear()
    job = make_job(prepared, tmp_path / "j", export=str(poly_export), mode="z", steps=2, eval_every=0)
    run_job(job)
    stamp = (tmp_path / "j" / RESULT_FILE).stat().st_mtime_ns
    run_job(job)
    assert any("skipped" in line for line in logs)
    assert (tmp_path / "j" / RESULT_FILE).stat().st_mtime_ns == stamp

    # a crash (here in the final evaluation, with either trainer): result says failed, no marker; the next
    # run redoes the job
    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(job_mod, "evaluate", boom)
    crashed = make_job(prepared, tmp_path / "c", export=str(poly_export), mode="z", steps=2, eval_every=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(crashed)
    failed = json.loads((tmp_path / "c" / RESULT_FILE).read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    assert not (tmp_path / "c" / MARKER_FILE).exists() and not is_complete(tmp_path / "c")
    monkeypatch.undo()
    logs.clear()
    result = run_job(crashed)
    assert result["status"] == "complete" and is_complete(tmp_path / "c")
    assert not any("skipped" in line for line in logs)

    # killed after result.json but before the marker: rerun too
    (tmp_path / "j" / MARKER_FILE).unlink()
    assert not is_complete(tmp_path / "j")
    logs.clear()
    run_job(job)
    assert not any("skipped" in line for line in logs) and is_complete(tmp_path / "j")


def test_zero_shot_and_mhr_mu_recipe(prepared, tmp_path):
    export = make_export(prepared, tmp_path / "mhr", "mhr", skills=2, heads=2)
    zs = run_job(make_job(prepared, tmp_path / "zs", export=str(export), mode="mu", k=0))
    assert zs["zero_shot"] and zs["k"] == 0 and [e["step"] for e in zs["evaluations"]] == [0]
    assert zs["train_loss"] == []
    recipe = run_job(
        make_job(
            prepared,
            tmp_path / "mt",
            export=str(export),
            mode="mu",
            k=0,
            collapse=True,
            multitask_steps=3,
            multitask_batch_size=4,
        )
    )
    assert len(recipe["multitask_loss"]) == 3 and recipe["zero_shot"]
    # collapsed: one rank-1 LoRA per layer instead of 2 skills
    assert recipe["params"]["trainable"] * 2 == recipe["params"]["multi_task"]["modules"]
    assert recipe["routing_file"] is None


def test_fullft_and_fresh_lora_baselines(prepared, tmp_path):
    ft = run_job(make_job(prepared, tmp_path / "ft", method="fullft", steps=2, eval_every=0))
    assert ft["label"] == "FullFT" and ft["params"]["trainable"] == ft["params"]["backbone"]
    lora = run_job(make_job(prepared, tmp_path / "lora", method="lora", adapter={"rank": 2}, steps=2, eval_every=0))
    assert lora["label"] == "LoRA (w/o pretrain)" and 0 < lora["params"]["trainable"] < lora["params"]["backbone"]
    ia3 = run_job(make_job(prepared, tmp_path / "ia3", method="ia3", steps=2, eval_every=0))
    # (IA)^3 on k, v (self + cross attention) and wi_1 of the tiny T5: 2 enc + 2 dec blocks, d_model 64, d_ff 128
    assert ia3["label"] == "(IA)^3 (w/o pretrain)" and ia3["params"]["trainable"] == 2 * (2 * 64 + 128) + 2 * (
        4 * 64 + 128
    )


def test_invalid_jobs_are_refused(prepared, poly_export, tmp_path):
    with pytest.raises(JobError, match="mode"):
        make_job(prepared, tmp_path / "x", export=str(poly_export), mode="zz")
    with pytest.raises(JobError, match="FullFT"):
        make_job(prepared, tmp_path / "x", method="fullft", mode="z")
    with pytest.raises(JobError, match="unknown job field"):
        AdaptJob.from_dict({"out_dir": "o", "data_dir": "d", "task": "t", "method": "lora", "sed": 1})
    lora = make_export(prepared, tmp_path / "lora_export", "lora")
    with pytest.raises(ModeError, match=r"method 'lora' has no routing, so mode 'z' does not apply"):
        run_job(make_job(prepared, tmp_path / "y", export=str(lora), mode="z"))
    assert json.loads((tmp_path / "y" / RESULT_FILE).read_text())["status"] == "failed"
    with pytest.raises(JobError, match="no 7-shot"):
        run_job(make_job(prepared, tmp_path / "w", export=str(poly_export), k=7))


def test_engine_available_raises_on_a_broken_engine_and_is_false_only_when_absent(monkeypatch):
    """An engine that is there but fails to import (here: DeepSpeed missing) is an error naming the cause,
    never a quiet fallback to the local trainer; only an absent engine subpackage makes auto pick local.
    Mutation seen caught: engine_available's old `except ImportError: return False` (no JobError raised)."""
    assert job_mod.engine_available()
    real_import = job_mod.importlib.import_module

    def broken(name, *args):
        if name.endswith(".engine.trainer"):
            raise ModuleNotFoundError("No module named 'deepspeed'", name="deepspeed")
        return real_import(name, *args)

    monkeypatch.setattr(job_mod.importlib, "import_module", broken)
    auto = AdaptJob.from_dict({"out_dir": "o", "data_dir": "d", "task": "t", "method": "lora", "trainer": "auto"})
    with pytest.raises(
        JobError,
        match=r"engine is installed but does not import \(ModuleNotFoundError: No module "
        r"named 'deepspeed'\)",
    ):
        job_mod.resolve_trainer(auto)
    monkeypatch.setattr(job_mod.importlib.util, "find_spec", lambda name: None)
    assert job_mod.resolve_trainer(auto) == "local"
    engine = AdaptJob.from_dict({**auto.to_dict(), "trainer": "engine"})
    with pytest.raises(JobError, match="'trainer' = 'engine' but tensorpoly_ds.engine is not installed"):
        job_mod.resolve_trainer(engine)
