"""Random-mu in the engine: resuming from a checkpoint reproduces the uninterrupted run (the allocations come
from Python's RNG, which the checkpoint restores)."""

import dataclasses
import shutil

import pytest
import torch

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters
from tensorpoly_ds.engine.data import PreparedData
from tensorpoly_ds.engine.trainer import Trainer
from tests.engine.test_trainer_api import process_group, sections, tiny  # noqa: F401  (module fixture)


def test_random_routing_resume_equals_uninterrupted(tmp_path, prepared_dir):
    data = PreparedData.open(prepared_dir)
    rows = data.split("train")
    cfg = AdapterConfig(method="mhr", skills=4, heads=2, routing="random")
    s = sections(steps=6, eval_at_end=False, export_at_end=False)
    s["train"] = dataclasses.replace(s["train"], save_every=3)

    def run(run_dir, resume="none"):
        model = inject_adapters(tiny(), cfg, len(data.tasks))
        return Trainer(model, rows, run_dir=run_dir, tasks=data.tasks, **s).run(resume)

    full = run(tmp_path / "full")
    losses = {h["step"]: h["train/loss"] for h in full.history}
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints", resumed_dir / "checkpoints")
    latest = sorted((resumed_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in latest] == ["step_00000003", "step_00000006"]
    shutil.rmtree(latest[-1])
    resumed = run(resumed_dir, resume="auto")
    again = {h["step"]: h["train/loss"] for h in resumed.history}
    assert sorted(again) == [4, 5, 6]
    for step in again:
        assert again[step] == pytest.approx(losses[step], rel=1e-6), step
    assert len(set(losses.values())) == 6  # the allocations (and losses) change from step to step
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, msg=name)
