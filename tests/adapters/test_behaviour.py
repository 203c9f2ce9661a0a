"""Gradients, init, merge, mu collapse and mixed-task batches, method by method."""

import pytest
import torch
from torch import nn

from tensorpoly_ds.adapters import (
    AdapterConfig,
    RoutingError,
    collapse_to_lora,
    inject_adapters,
    merge_adapters,
    prepare_adaptation,
    routing_tables,
    task_routing,
)
from tensorpoly_ds.adapters.inject import ADAPTER_CLASSES
from tensorpoly_ds.adapters.routing import RoutingTable
from tests.conftest import tiny_t5

ALL = {
    "lora": dict(rank=2),
    "tlora": dict(rank=2, tensor_rank=2, order=2),
    "tlora_ln": dict(method="tlora", rank=2, tensor_rank=2, order=2, layernorm=True, layernorm_affine="trainable"),
    "tlora_gain": dict(method="tlora", rank=2, tensor_rank=2, order=2, layernorm=True, output_gain=True),
    "poly": dict(rank=2, skills=3),
    "mhr": dict(rank=2, skills=3, heads=2),
    "tensorpoly_i": dict(rank=2, tensor_rank=3, order=2),
    "tensorpoly_i_gain": dict(method="tensorpoly_i", rank=2, tensor_rank=3, order=2, layernorm=True, output_gain=True),
    "tensorpoly_ii": dict(rank=2, tensor_rank=3, order=2),
    "tensorpoly_ii_paper": dict(
        method="tensorpoly_ii", rank=2, tensor_rank=3, order=2, tensorpoly_ii_semantics="paper"
    ),
    "tensorpoly_x": dict(tensor_rank=2, order=2),
    "ia3": dict(),
}
ZERO_INIT = ("lora", "poly", "mhr", "tensorpoly_x", "ia3", "tlora_gain", "tensorpoly_i_gain")
UNROUTED = ("lora", "tlora", "tlora_ln", "tlora_gain", "ia3")


def cfg_for(key, **extra):
    kw = dict(ALL[key])
    method = kw.pop("method", key)
    return AdapterConfig(method=method, **kw, **extra)


def make_layer(key, num_tasks=3, d_in=8, d_out=6, dtype=torch.float64, cfg=None):
    cfg = cfg or cfg_for(key)
    base = nn.Linear(d_in, d_out).to(dtype)
    mod = ADAPTER_CLASSES[cfg.method](base, cfg, "encoder", key)
    if mod.routing_shape is not None:
        heads, skills = mod.routing_shape
        mod.attach_routing(RoutingTable(num_tasks, heads, skills, normalise_dim=mod.routing_normalise_dim, dtype=dtype))
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if not name.startswith("base."):
                p.add_(0.3 * torch.randn_like(p))
    return mod


class _Holder(nn.Module):
    """Registers the layer and its routing table together so functional_call can swap both."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.table = layer, layer.routing

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("key", list(ALL))
def test_float64_gradcheck_through_routing_and_modules(key):
    holder = _Holder(make_layer(key))
    names = [n for n, p in holder.named_parameters() if p.requires_grad and ".base." not in n]
    assert any("table.logits" in n for n in names) == (holder.table is not None)
    params = dict(holder.named_parameters())
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    ids = torch.tensor([0, 2, 0])

    def forward(*values):
        with task_routing(ids):
            return torch.func.functional_call(holder, dict(zip(names, values)), (x,))

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(forward, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("key", ZERO_INIT)
def test_zero_initialised_methods_leave_base_outputs_unchanged(key):
    model = tiny_t5()
    x = torch.randint(2, 64, (2, 6))
    y = torch.randint(2, 64, (2, 3))
    before = model(input_ids=x, labels=y).logits
    inject_adapters(model, cfg_for(key), num_tasks=4)
    with task_routing(torch.tensor([1, 3])):
        after = model(input_ids=x, labels=y).logits
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("key", list(ALL))
def test_merge_gives_the_same_outputs(key):
    model = tiny_t5().double()
    inject_adapters(model, cfg_for(key), num_tasks=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    x = torch.randint(2, 64, (2, 6))
    y = torch.randint(2, 64, (2, 3))
    with task_routing(2):
        expected = model(input_ids=x, labels=y).logits
    merge_adapters(model, task_id=2)
    assert not any("lora" in n or "leaves" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids=x, labels=y).logits, expected)


@pytest.mark.parametrize("key", ["poly", "mhr"])
def test_mu_collapse_equals_uniform_routing(key):
    model = tiny_t5().double()
    inject_adapters(model, cfg_for(key), num_tasks=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    prepare_adaptation(model, "mu")
    x = torch.randint(2, 64, (2, 6))
    y = torch.randint(2, 64, (2, 3))
    with task_routing(0):
        uniform = model(input_ids=x, labels=y).logits
    collapse_to_lora(model)
    assert not routing_tables(model)
    with task_routing(0):
        torch.testing.assert_close(model(input_ids=x, labels=y).logits, uniform)


@pytest.mark.parametrize("key", [k for k in ALL if k not in UNROUTED])
def test_mixed_task_batch_equals_each_task_alone(key):
    mod = make_layer(key, num_tasks=4)
    with torch.no_grad():
        mod.routing.logits.normal_()
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    ids = torch.tensor([3, 0, 3, 1, 2])
    with task_routing(ids):
        mixed = mod(x)
    for row, task in enumerate(ids.tolist()):
        with task_routing(task):
            alone = mod(x[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone)


def test_routing_errors_are_explicit():
    mod = make_layer("poly")
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    with pytest.raises(RoutingError, match="outside task_routing"):
        mod(x)
    with pytest.raises(RoutingError, match="3 rows but 2 task ids"):
        with task_routing(torch.tensor([0, 1])):
            mod(x)
    with pytest.raises(RoutingError, match="integer"):
        with task_routing(torch.tensor([0.5])):
            pass


def test_decoder_ids_follow_the_decoder_batch():
    """Rank-classification shape: 2 examples, 3 choices each; the decoder sees 6 rows."""
    model = tiny_t5().double()
    inject_adapters(model, cfg_for("poly"), num_tasks=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    x = torch.randint(2, 64, (2, 5))
    choices = torch.randint(2, 64, (6, 3))
    ids = torch.tensor([1, 3])
    with task_routing(ids):
        enc = model.get_encoder()(input_ids=x).last_hidden_state
    dec_ids = ids.repeat_interleave(3)
    from transformers.modeling_outputs import BaseModelOutput

    with task_routing(ids, decoder_task_ids=dec_ids):
        batched = model(
            encoder_outputs=BaseModelOutput(enc.repeat_interleave(3, 0)),
            attention_mask=torch.ones(6, 5, dtype=torch.long),
            labels=choices,
        ).logits
    for row in range(6):
        ex = row // 3
        with task_routing(int(ids[ex])):
            alone = model(input_ids=x[ex : ex + 1], labels=choices[row : row + 1]).logits
        torch.testing.assert_close(batched[row : row + 1], alone)


def test_gumbel_noise_in_training_only_and_straight_through_is_hard():
    table = RoutingTable(2, 1, 4, gumbel=True, temperature=1.0)
    ids = torch.tensor([0, 1])
    table.train()
    assert not torch.equal(table.weights(ids), table.weights(ids))
    table.eval()
    torch.testing.assert_close(table.weights(ids), table.weights(ids))
    expected = torch.sigmoid(table.logits[ids])
    torch.testing.assert_close(table.weights(ids), expected / expected.sum(-1, keepdim=True))
    hard = RoutingTable(1, 1, 6, gumbel=True, straight_through=True).train()
    w = hard.weights(torch.tensor([0]))
    nonzero = w[w > 0]
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, 1.0 / nonzero.numel()))
    w.sum().backward()
    assert hard.logits.grad is not None


@pytest.mark.parametrize(
    "cfg,dropout",
    [
        (cfg_for("poly"), 0.0),
        # Random-mu draws inside checkpointed blocks: with dropout on, the recomputation must see the same
        # allocation and the same dropout masks (tables per layer, and one table shared by every layer)
        (AdapterConfig(method="mhr", rank=2, skills=3, heads=2, routing="random"), 0.2),
        (AdapterConfig(method="mhr", rank=2, skills=3, heads=2, routing="random", routing_granularity="model"), 0.2),
    ],
    ids=["poly", "random_mhr_layer", "random_mhr_model"],
)
def test_activation_checkpointing_sees_the_same_task_ids(cfg, dropout):
    import random

    from tensorpoly_ds.adapters import routing_checkpoint_context_fn

    def run(checkpointing):
        torch.manual_seed(0)
        random.seed(0)
        model = tiny_t5(dropout_rate=dropout)
        inject_adapters(model, cfg, num_tasks=3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.3)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": routing_checkpoint_context_fn}
            )
        x = torch.randint(2, 64, (3, 6))
        y = torch.randint(2, 64, (3, 4))
        losses = []
        for _ in range(2):
            with task_routing(torch.tensor([0, 2, 1])):
                loss = model(input_ids=x, labels=y).loss
            loss.backward()  # recomputation happens here, outside the routing scope
            losses.append(loss.item())
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (plain_losses, plain), (ckpt_losses, ckpt) = run(False), run(True)
    # Two code paths (the checkpointed forward runs its segments under no_grad), so the kernels may differ: on
    # Intel CPUs the float32 losses (~30, a sum over a 2+2-layer T5) differ in the last bits (2.5e-7 relative).
    # torch's float32 tolerance (rtol 1.3e-6, about 10 ulp) covers that; a wrong task id in the recomputation
    # changes the gradients by far more (the grads are compared below).
    torch.testing.assert_close(ckpt_losses, plain_losses)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


@pytest.mark.parametrize(
    "gen_kwargs",
    [
        dict(num_beams=1),
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=2),
        dict(do_sample=True, num_return_sequences=2),
    ],
)
def test_generation_with_mixed_tasks_equals_each_task_alone(gen_kwargs):
    from tensorpoly_ds.adapters import generate

    model = tiny_t5()
    inject_adapters(model, cfg_for("poly"), num_tasks=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    x = torch.randint(2, 64, (3, 6))
    ids = torch.tensor([2, 0, 1])
    kw = dict(max_new_tokens=5, min_new_tokens=5, **gen_kwargs)
    torch.manual_seed(3)
    together = generate(model, x, ids, **kw)
    per_row = together.shape[0] // 3
    for row in range(3):
        torch.manual_seed(3)
        alone = generate(model, x[row : row + 1], ids[row : row + 1], **kw)
        if gen_kwargs.get("do_sample"):
            assert alone.shape == together[row * per_row : (row + 1) * per_row].shape
        else:
            torch.testing.assert_close(alone, together[row * per_row : (row + 1) * per_row])
