"""The gradient-alignment monitor: training with it equals training without it, and the logged matrix equals
a direct computation of the per-task gradient cosines."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tensorpoly_ds.adapters import AdapterConfig, adapter_param_groups, inject_adapters, task_routing
from tensorpoly_ds.engine.config import DeepSpeedSection, RunConfigError, load_run_config
from tensorpoly_ds.engine.data import IGNORE_INDEX, PreparedData, collate
from tensorpoly_ds.engine.grad_alignment import GradAlignmentError, select_tasks
from tensorpoly_ds.engine.trainer import Trainer
from tests.engine.test_trainer_api import process_group, sections, tiny  # noqa: F401  (module fixture)


def run(tmp_path, name, data, rows, *, every, stage=0, tasks=()):
    s = sections(steps=4, eval_at_end=False, export_at_end=False)
    s["train"] = dataclasses.replace(
        s["train"], grad_alignment_every=every, grad_alignment_tasks=list(tasks), grad_alignment_rows=3
    )
    s["deepspeed"] = DeepSpeedSection(zero_stage=stage, precision="fp32")
    model = inject_adapters(tiny(), AdapterConfig(method="poly", skills=4), len(data.tasks))
    return Trainer(model, rows, run_dir=tmp_path / name, tasks=data.tasks, **s).run()


def direct_matrix(model, rows, task_ids, per_task):
    """Per task: its first rows, loss.backward() into .grad, flatten the module gradients, pairwise cosine."""
    params = adapter_param_groups(model)["modules"]
    model.eval()
    grads = []
    for t in task_ids:
        idx = [i for i, tid in enumerate(rows["task_id"]) if tid == t][:per_task]
        batch = collate([rows[i] for i in idx])
        for p in params:
            p.grad = None
        with task_routing(batch["task_ids"]):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    g = torch.stack(grads)
    return F.cosine_similarity(g[:, None, :], g[None, :, :], dim=-1)


def alignment_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "grad_alignment"]


@pytest.mark.parametrize("stage,n_tasks", [(0, None), (2, 3)])  # None: the default choice of tasks
def test_monitor_leaves_training_unchanged_and_logs_the_direct_matrix(tmp_path, prepared_dir, stage, n_tasks):
    data = PreparedData.open(prepared_dir)
    rows = data.split("train")
    tasks = data.tasks[:n_tasks] if n_tasks else []
    off = run(tmp_path, "off", data, rows, every=0, stage=stage)
    on = run(tmp_path, "on", data, rows, every=2, stage=stage, tasks=tasks)
    assert [h["train/loss"] for h in on.history] == [h["train/loss"] for h in off.history]
    for (name, a), (_, b) in zip(off.model.named_parameters(), on.model.named_parameters()):
        assert torch.equal(a, b), name
    records = alignment_records(tmp_path / "on")
    assert [r["step"] for r in records] == [2, 4] and not alignment_records(tmp_path / "off")
    last = records[-1]
    ids = select_tasks(data.tasks, tasks)
    assert last["tasks"] == [data.tasks[t] for t in ids] and len(ids) == (n_tasks or min(8, len(data.tasks)))
    expected = direct_matrix(on.model, rows, ids, per_task=3)  # the parameters after step 4
    torch.testing.assert_close(torch.tensor(last["matrix"]), expected, atol=2e-6, rtol=0)
    n = len(ids)
    assert last["grad_alignment/mean_offdiag"] == pytest.approx(float((expected.sum() - n) / (n * (n - 1))), abs=1e-5)
    assert (tmp_path / "on" / "tb").is_dir()


def test_chosen_tasks_and_refusals(tmp_path, prepared_dir):
    data = PreparedData.open(prepared_dir)
    rows = data.split("train")
    picked = data.tasks[3], data.tasks[0]
    run(tmp_path, "picked", data, rows, every=4, tasks=picked)
    assert alignment_records(tmp_path / "picked")[0]["tasks"] == list(picked)
    with pytest.raises(GradAlignmentError, match=r"unknown task\(s\) \['no_such_task'\]"):
        run(tmp_path, "bad", data, rows, every=2, tasks=["no_such_task"])
    with pytest.raises(GradAlignmentError, match="at least 2 tasks"):
        run(tmp_path, "one", data, rows, every=2, tasks=[data.tasks[0]])
    with pytest.raises(RunConfigError, match="grad_alignment_every.*ZeRO-3"):
        load_run_config([], ["train.grad_alignment_every=10", "deepspeed.zero_stage=3"])
    with pytest.raises(RunConfigError, match="grad_alignment_every.*full fine-tune"):
        load_run_config([], ["train.grad_alignment_every=10", "adapter=null", "train.full_finetune=true"])
