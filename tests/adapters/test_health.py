"""Adapter health (tensorpoly_ds.adapters.health): the recorded ratio is ||delta W x|| / ||W0 x|| computed
directly, zero for a LoRA at init, nothing recorded outside `recording()`; gradient norms by group. The engine
side (metrics.jsonl, ranks, ZeRO stages) is checked on the shared engine runs in tests/engine."""

import pytest
import torch

from tensorpoly_ds.adapters import adapter_layers, adapter_param_groups, health, inject_adapters, task_routing
from tests.adapters.test_behaviour import cfg_for, make_layer
from tests.conftest import tiny_t5


@pytest.mark.parametrize("key", ["lora", "tensorpoly_i_gain", "poly", "ia3"])
def test_recorded_ratio_equals_the_direct_computation_over_two_forwards(key):
    """Two forward passes (two micro-batches) accumulate. Mutations: record() storing the plain norms instead of
    their squares, or overwriting instead of adding -> the ratios differ."""
    layer = make_layer(key, num_tasks=3, d_in=8, d_out=6)
    xs = [torch.randn(4, 5, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)]
    ids = [torch.tensor([0, 2, 1, 2]), torch.tensor([1, 1])]
    with health.recording():
        for x, i in zip(xs, ids):
            with task_routing(i):
                layer(x)
    sums = health.take_sums({"encoder.block.0.layer.0.SelfAttention.q": layer})
    assert layer.health_sums is None  # reset
    delta_sq = base_sq = 0.0
    for x, i in zip(xs, ids):
        for row, task in zip(x, i.tolist()):
            weights = layer.routing.weights(torch.tensor([task]))[0] if layer.routing is not None else None
            if key == "ia3":  # a rescaled output: delta_weight leaves out the bias's share
                delta = layer.base(row).detach() * (layer.ia3_scale.detach() - 1)
            else:
                delta = row @ layer.delta_weight(weights).detach()
            delta_sq += float(delta.square().sum())
            base_sq += float(layer.base(row).detach().square().sum())
    assert delta_sq > 0
    expected = (delta_sq**0.5) / (base_sq**0.5)
    metrics = health.ratio_metrics(["encoder.block.0.layer.0.SelfAttention.q"], sums)
    # float32 sums of ~100 float64 squares: relative error ~1e-6
    assert metrics["train/delta_ratio/mean"] == pytest.approx(expected, rel=1e-5)
    assert metrics["train/delta_ratio/encoder_self_attention"] == metrics["train/delta_ratio/mean"]


def test_lora_at_init_is_zero_and_nothing_is_recorded_outside_recording():
    """Mutation: AdapterLinear.forward recording unconditionally -> the first take_sums is not None."""
    torch.manual_seed(0)
    model = tiny_t5()
    inject_adapters(model, cfg_for("lora"), num_tasks=1)
    layers = adapter_layers(model)
    x, y = torch.randint(2, 64, (2, 6)), torch.randint(2, 64, (2, 3))
    model(input_ids=x, labels=y)
    assert health.take_sums(layers) is None
    with health.recording():
        model(input_ids=x, labels=y)
    sums = health.take_sums(layers)
    assert sums.shape == (len(layers), 2) and torch.all(sums[:, 1] > 0)
    metrics = health.ratio_metrics(list(layers), sums)
    assert metrics["train/delta_ratio/mean"] == 0.0
    assert set(metrics) == {
        "train/delta_ratio/mean",
        "train/delta_ratio/encoder_self_attention",
        "train/delta_ratio/encoder_ffn",
        "train/delta_ratio/decoder_self_attention",
        "train/delta_ratio/decoder_cross_attention",
        "train/delta_ratio/decoder_ffn",
    }


def test_a_layer_the_forward_does_not_reach_is_left_out():
    """Mutation: take_sums returning None when any layer has no record -> no metrics at all."""
    torch.manual_seed(0)
    model = tiny_t5()
    inject_adapters(model, cfg_for("lora"), num_tasks=1)
    layers = adapter_layers(model)
    with health.recording():
        model.encoder(input_ids=torch.randint(2, 64, (2, 6)))  # the decoder's layers see nothing
    sums = health.take_sums(layers)
    assert sums is not None and int((sums[:, 1] == 0).sum()) == sum("decoder" in n for n in layers)
    metrics = health.ratio_metrics(list(layers), sums)
    assert metrics["train/delta_ratio/mean"] == 0.0 and not any("decoder" in k for k in metrics)


def test_grad_norms_by_group_count_a_replicated_gradient_once():
    """Mutation: the `rank == 0` condition dropped -> rank 1 contributes the replicated gradient again."""
    torch.manual_seed(0)
    model = tiny_t5()
    inject_adapters(model, cfg_for("poly"), num_tasks=2)
    with task_routing(torch.tensor([0, 1])):
        model(input_ids=torch.randint(2, 64, (2, 6)), labels=torch.randint(2, 64, (2, 3))).loss.backward()
    groups = adapter_param_groups(model)
    expected = [float(sum(p.grad.double().square().sum() for p in groups[g])) for g in ("modules", "routing")]
    got = health.grad_square_sums(groups, rank=0, device="cpu")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.all(health.grad_square_sums(groups, rank=1, device="cpu") == 0)
    metrics = health.grad_metrics(list(groups), got)
    assert metrics["train/adapter_grad_norm/routing"] == pytest.approx(expected[1] ** 0.5)


def test_layer_groups_by_projection_name():
    assert health.layer_group("decoder.block.1.layer.1.EncDecAttention.q") == "decoder_cross_attention"
    assert health.layer_group("encoder.block.0.layer.1.DenseReluDense.wi_0") == "encoder_ffn"
    assert health.layer_group("model.decoder.layers.0.fc1") == "decoder_other"
