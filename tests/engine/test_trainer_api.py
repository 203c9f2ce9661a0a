"""The reusable training API (tensorpoly_ds.engine.trainer.Trainer), in this process (one rank, ZeRO-0)."""

import pytest
import torch

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters, load_adapters, task_routing
from tensorpoly_ds.engine.config import DeepSpeedSection, OptimSection, TrainSection
from tensorpoly_ds.engine.data import PreparedData, collate
from tensorpoly_ds.engine.trainer import DataOptions, Trainer, TrainHooks, lm_loss


@pytest.fixture(scope="module", autouse=True)
def process_group():
    from tensorpoly_ds.engine import distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        import os

        os.environ.pop(key, None)
    dist.init_distributed()
    yield


def tiny(seed=0):
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.models import t5_config

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(t5_config("tiny", vocab_size=130))


def sections(steps=12, **train_kw):
    optim = OptimSection(name="adamw", module_lr=1e-2, routing_lr=0.1, lr=1e-3, warmup_ratio=0.1)
    tr = TrainSection(
        steps=steps,
        micro_batch=4,
        grad_accum=2,
        eval_every=5,
        save_every=0,
        log_every=1,
        seed=0,
        progress_bar=False,
        **train_kw,
    )
    return dict(optim=optim, train=tr, deepspeed=DeepSpeedSection(zero_stage=0, precision="fp32"))


def test_train_api_with_hooks_and_export_reload(tmp_path, prepared_dir):
    data = PreparedData.open(prepared_dir)
    rows, val = data.split("train"), data.split("val")
    model = inject_adapters(tiny(), AdapterConfig(method="poly", skills=4), len(data.tasks))
    calls = {"eval": [], "steps": 0}

    def loss_fn(m, batch):  # adaptation-style hook: the LM loss plus an extra term, reports a stat
        loss_sum, _ = lm_loss(m, batch)
        assert batch["task_name"] and len(batch["task_name"]) == batch["input_ids"].shape[0]  # extra columns pass
        return loss_sum, {"rows": float(batch["input_ids"].shape[0])}

    def eval_fn(engine, step):
        calls["eval"].append(step)
        return {"custom/metric": float(step)}

    def on_step(step, metrics):
        calls["steps"] += 1

    result = Trainer(
        model,
        rows,
        run_dir=tmp_path / "run",
        tasks=data.tasks,
        val_rows=val,
        data=DataOptions(val_max_samples=40),
        hooks=TrainHooks(loss_fn=loss_fn, eval_fn=eval_fn, on_step=on_step),
        **sections(),
    ).run()
    assert result.status == "done" and result.step == 12 and result.exit_code == 0
    assert calls["eval"] == [5, 10, 12] and calls["steps"] == 12
    losses = [h["train/loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.history[0]["train/rows"] == 8.0
    assert set(h for h in result.history[0] if h.startswith("lr/")) == {"lr/modules", "lr/routing"}

    # the export reloads into a fresh backbone with identical outputs
    fresh = tiny()
    load_adapters(fresh, result.export_dir)
    trained = result.model.eval()
    fresh.eval()
    batch = collate([val[i] for i in range(6)])
    with torch.no_grad(), task_routing(batch["task_ids"]):
        a = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
        b = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    assert torch.equal(a, b)
    meta = __import__("json").loads((result.export_dir / "adapter_config.json").read_text())
    assert meta["tasks"] == data.tasks and meta["adapter"]["method"] == "poly"


def test_gradient_checkpointing_gives_the_same_training(tmp_path, prepared_dir):
    data = PreparedData.open(prepared_dir)
    rows = data.split("train")
    out = []
    for gc in (False, True):
        model = inject_adapters(tiny(), AdapterConfig(method="poly", skills=4), len(data.tasks))
        s = sections(steps=4, gradient_checkpointing=gc, eval_at_end=False, export_at_end=False)
        out.append(Trainer(model, rows, run_dir=tmp_path / f"gc{gc}", tasks=data.tasks, **s).run())
    la = [h["train/loss"] for h in out[0].history]
    lb = [h["train/loss"] for h in out[1].history]
    assert out[1].model.is_gradient_checkpointing
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)


def test_adapter_health_changes_no_number_of_the_run(tmp_path, prepared_dir):
    """The same run with train.adapter_health off and on: bitwise the same losses, gradient norms and trained
    parameters (the same computation twice; the monitor only reads). TensorPoly-I with the output gain, whose
    delta starts at 0. Mutation: record() writing into the forward's delta (delta.detach().mul_(2)) -> the
    losses differ."""
    data = PreparedData.open(prepared_dir)
    rows = data.split("train")
    out = []
    for on in (False, True):
        model = inject_adapters(
            tiny(),
            AdapterConfig(method="tensorpoly_i", rank=2, tensor_rank=2, layernorm=True, output_gain=True),
            len(data.tasks),
        )
        s = sections(steps=3, adapter_health=on, eval_at_end=False, export_at_end=False)
        out.append(Trainer(model, rows, run_dir=tmp_path / f"health{on}", tasks=data.tasks, **s).run())
    off, on = out
    for key in ("train/loss", "train/grad_norm"):
        assert [h[key] for h in off.history] == [h[key] for h in on.history], key
    for (name, a), (_, b) in zip(off.model.named_parameters(), on.model.named_parameters()):
        assert torch.equal(a, b), name
    assert not any(k.startswith("train/delta_ratio") for k in off.history[0])
    ratios = [h["train/delta_ratio/mean"] for h in on.history]
    assert ratios[0] == 0.0 and ratios[-1] > 0  # the gain starts at 0, then the delta grows
    assert on.history[0]["train/adapter_grad_norm/modules"] > 0


def test_full_finetune_trains_every_parameter(tmp_path, prepared_dir):
    from transformers import T5ForConditionalGeneration

    data = PreparedData.open(prepared_dir)
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = Trainer(model, data.split("train"), run_dir=tmp_path / "ft", tasks=data.tasks, **sections(steps=4)).run()
    after = result.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "relative_attention_bias" not in k)
    assert [h for h in result.history[0] if h.startswith("lr/")] == ["lr/base"]
    reloaded = T5ForConditionalGeneration.from_pretrained(str(result.export_dir))
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, after[k]), k


@pytest.mark.parametrize("batching", ["random", "length_grouped"])
def test_loss_normaliser_per_batching(tmp_path, prepared_dir, batching):
    """The gradient reaching each micro-batch's loss sum is 1 / normaliser (ZeRO-0, 1 rank: DeepSpeed divides
    by accum, the trainer multiplied by it). Random order: the step's own target-token count. Length-grouped:
    the split's mean count per step, the same for every step, so a token's weight does not depend on the
    lengths of the rows it shares a step with. Mutation seen caught: fixed_norm left None (length_grouped
    then divides by each step's count)."""
    from tensorpoly_ds.engine.data import TrainStream
    from tensorpoly_ds.engine.trainer import token_weight

    data = PreparedData.open(prepared_dir)
    rows = data.split("train")
    model = inject_adapters(tiny(), AdapterConfig(method="poly", skills=4), len(data.tasks))
    seen = []

    def loss_fn(m, batch):
        loss_sum, stats = lm_loss(m, batch)
        loss_sum.register_hook(lambda g, w=token_weight(batch): seen.append((float(g), w)))
        return loss_sum, stats

    kw = sections(steps=3, eval_at_end=False, export_at_end=False, save_checkpoints=False)
    Trainer(
        model,
        rows,
        run_dir=tmp_path / "run",
        tasks=data.tasks,
        hooks=TrainHooks(loss_fn=loss_fn),
        data=DataOptions(batching=batching, group_size=2),
        **kw,
    ).run()
    assert len(seen) == 6
    step_counts = [seen[i][1] + seen[i + 1][1] for i in (0, 2, 4)]
    assert len(set(step_counts)) > 1  # the steps' counts differ, so the two normalisers are distinguishable
    if batching == "random":
        expected = [1 / c for c in step_counts for _ in range(2)]
    else:
        mean = TrainStream(rows, seed=0, micro_batch=4, grad_accum=2, batching=batching).mean_step_targets()
        assert mean == pytest.approx(8 * sum(len(t) for t in rows["target_ids"]) / len(rows))
        expected = [1 / mean] * 6
    # float32 gradients of a float64 reciprocal: 1e-6 relative
    assert [g for g, _ in seen] == pytest.approx(expected, rel=1e-6)
