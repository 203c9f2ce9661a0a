"""The output gain of the Kronecker family (AdapterConfig.output_gain): delta W = 0 at init, a non-zero
gradient on the gain, and a non-zero delta after one step. Gradcheck, merge, export/reload, injection and
random routing run it through test_behaviour.ALL ("tlora_gain", "tensorpoly_i_gain"); factor recomputation
through test_kron_factors.CASES; ZeRO-3 through test_zero3."""

import dataclasses

import pytest
import torch

from tensorpoly_ds.adapters import AdapterConfig, ConfigError, adapter_layers, inject_adapters, task_routing
from tensorpoly_ds.adapters.peft_interop import PeftInteropError, check_exportable
from tensorpoly_ds.engine.config import OptimSection
from tensorpoly_ds.engine.trainer import param_groups
from tensorpoly_ds.parameter_count import count_parameters
from tests.adapters.test_behaviour import cfg_for
from tests.conftest import tiny_t5

GAINED = ["tlora_gain", "tensorpoly_i_gain"]


def batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(2, 64, (3, 6), generator=gen), torch.randint(2, 64, (3, 4), generator=gen)


@pytest.mark.parametrize("key", GAINED)
def test_delta_is_exactly_zero_at_init_and_only_the_gain_gets_gradient(key):
    """Mutation: the gain initialised at 1 (torch.ones) -> the logits differ from the backbone's."""
    torch.manual_seed(0)
    model = tiny_t5()
    x, y = batch()
    inject_adapters(model, cfg_for(key), num_tasks=3)
    layers = adapter_layers(model).values()
    for layer in layers:
        assert not torch.any(
            layer.delta_weight(layer.routing.weights(torch.tensor([1]))[0] if layer.routing is not None else None)
        )
    # the same base computation with the adapters bypassed (merged=True skips the delta, nothing is folded)
    for layer in layers:
        layer.merged = True
    with torch.no_grad():
        backbone = model(input_ids=x, labels=y).logits
    for layer in layers:
        layer.merged = False
    with task_routing(torch.tensor([0, 1, 2])):
        out = model(input_ids=x, labels=y)
    assert torch.equal(out.logits, backbone)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("output_gain"):
            assert p.grad is not None and torch.all(p.grad != 0), name
        elif "leaves" in name:  # g = 0 multiplies every path to the factors
            assert p.grad is None or not torch.any(p.grad), name


@pytest.mark.parametrize("key", GAINED)
def test_one_optimizer_step_makes_the_delta_non_zero_and_the_factors_train_next(key):
    """Mutation: the gain left out of delta_from_weights (the forward returns the ungained delta) -> the delta
    is not zero at init (the previous test) and the gain gets no gradient here."""
    torch.manual_seed(0)
    model = tiny_t5()
    inject_adapters(model, cfg_for(key), num_tasks=3)
    x, y = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        with task_routing(torch.tensor([0, 1, 2])):
            model(input_ids=x, labels=y).loss.backward()
        opt.step()
    leaves = [p.grad for n, p in model.named_parameters() if "leaves" in n]
    assert leaves and all(torch.any(g != 0) for g in leaves)  # second step: g != 0, the factors train
    layer = next(iter(adapter_layers(model).values()))
    weights = layer.routing.weights(torch.tensor([0]))[0] if layer.routing is not None else None
    assert layer.output_gain.abs().item() > 0
    assert layer.delta_weight(weights).abs().max() > 0


def test_config_field_is_checked_and_left_out_of_dicts_at_its_default():
    """Old exports and run fingerprints hold no 'output_gain': to_dict omits it when False.
    Mutation: to_dict returning dataclasses.asdict -> 'output_gain' appears for a default config."""
    with pytest.raises(ConfigError, match="'output_gain' = True.*tlora, tensorpoly_i, tensorpoly_ii.*'poly'"):
        AdapterConfig(method="poly", output_gain=True)
    plain = AdapterConfig(method="tensorpoly_i", layernorm=True)
    assert "output_gain" not in plain.to_dict()
    gained = dataclasses.replace(plain, output_gain=True)
    assert gained.to_dict()["output_gain"] is True
    assert AdapterConfig.from_dict(gained.to_dict()) == gained
    assert AdapterConfig.from_dict(plain.to_dict()) == plain
    from tensorpoly_ds.adapters.export import config_differences

    assert config_differences(plain, gained) == ["output_gain: False vs True"]


def test_gain_is_a_module_parameter_counted_once_per_layer_and_not_exportable_to_peft():
    """Mutation: the gain registered as a plain tensor attribute (not an nn.Parameter) -> the count and the
    group membership fail."""
    cfg = cfg_for("tensorpoly_i_gain")
    model = tiny_t5()
    inject_adapters(model, cfg, num_tasks=3)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, OptimSection())}
    gains = [layer.output_gain for layer in adapter_layers(model).values()]
    assert all(id(g) in groups["modules"] and id(g) not in groups["routing"] for g in gains)
    with_gain = count_parameters("tiny", cfg, 3)
    without = count_parameters("tiny", dataclasses.replace(cfg, output_gain=False), 3)
    layers = with_gain["adapted_layers"]
    assert with_gain["multi_task"]["modules"] == without["multi_task"]["modules"] + layers
    assert with_gain["multi_task"]["routing"] == without["multi_task"]["routing"]
    with pytest.raises(PeftInteropError, match="field 'method' = 'tensorpoly_i'"):
        check_exportable(cfg, {}, inference_only=True)
