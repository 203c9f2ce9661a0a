"""Injection into a tiny T5: which modules, which parameters train, and that training works."""

import pytest
import torch
from torch import nn

from tensorpoly_ds.adapters import (
    AdapterConfig,
    AdapterLinear,
    ConfigError,
    InjectionError,
    adapter_layers,
    adapter_param_groups,
    inject_adapters,
    prepare_adaptation,
    routing_tables,
    task_routing,
)
from tests.adapters.test_behaviour import ALL, cfg_for
from tests.conftest import tiny_t5

SEVEN = {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}


def test_default_targets_are_the_seven_projections():
    model = tiny_t5()
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inject_adapters(model, AdapterConfig(method="lora"), num_tasks=1)
    wrapped = set(adapter_layers(model))
    assert {n.split(".")[-1] for n in wrapped} == SEVEN
    assert len(wrapped) == 2 * 7 + 2 * 11  # encoder: q,k,v,o + 3 FFN; decoder adds cross-attention
    assert wrapped == {n for n in linear_names if n.split(".")[-1] in SEVEN}
    assert "lm_head" not in wrapped
    for name, layer in adapter_layers(model).items():
        assert isinstance(layer.base, nn.Linear) and not isinstance(layer.base, AdapterLinear)


def test_ia3_targets_keys_values_and_gated_ffn():
    model = tiny_t5()
    inject_adapters(model, AdapterConfig(method="ia3"), num_tasks=1)
    assert {n.split(".")[-1] for n in adapter_layers(model)} == {"k", "v", "wi_1"}
    assert len(adapter_layers(model)) == 2 * 3 + 2 * 5


def test_non_gated_ffn_uses_wi():
    model = tiny_t5(feed_forward_proj="relu")
    inject_adapters(model, AdapterConfig(method="lora"), num_tasks=1)
    assert {n.split(".")[-1] for n in adapter_layers(model)} == {"q", "k", "v", "o", "wi", "wo"}


def test_custom_targets_and_no_match():
    model = tiny_t5()
    inject_adapters(model, AdapterConfig(method="lora", targets=r"SelfAttention\.q$"), num_tasks=1)
    assert len(adapter_layers(model)) == 4
    with pytest.raises(InjectionError, match="no nn.Linear"):
        inject_adapters(tiny_t5(), AdapterConfig(method="lora", targets="nothing_here"), num_tasks=1)


@pytest.mark.parametrize("key", list(ALL))
def test_only_adapter_parameters_train(key):
    model = tiny_t5()
    inject_adapters(model, cfg_for(key), num_tasks=3)
    wrapped = tuple(f"{n}." for n in adapter_layers(model))
    for name, p in model.named_parameters():
        is_adapter = name.startswith("tpds_routing.") or (name.startswith(wrapped) and ".base." not in name)
        assert p.requires_grad == is_adapter, name
    groups = adapter_param_groups(model)
    assert sum(map(len, groups.values())) == sum(p.requires_grad for p in model.parameters())
    assert len(groups["routing"]) == len(routing_tables(model))


@pytest.mark.parametrize("granularity,expected", [("layer", 36), ("block", 4), ("group", 2), ("model", 1)])
def test_routing_granularity(granularity, expected):
    model = tiny_t5()
    cfg = AdapterConfig(method="poly", skills=2, routing_granularity=granularity, routing_group_size=2)
    inject_adapters(model, cfg, num_tasks=5)
    tables = routing_tables(model)
    assert len(tables) == expected
    used = {id(layer.routing) for layer in adapter_layers(model).values()}
    assert used == {id(t) for t in tables.values()}


@pytest.mark.parametrize("key", list(ALL))
def test_a_few_optimiser_steps_reduce_the_loss(key):
    model = tiny_t5()
    inject_adapters(model, cfg_for(key), num_tasks=3)
    model.train()
    x = torch.randint(2, 64, (4, 8))
    y = torch.randint(2, 64, (4, 5))
    ids = torch.tensor([0, 1, 2, 1])
    groups = adapter_param_groups(model)
    opt = torch.optim.AdamW([{"params": groups["modules"], "lr": 1e-2}, {"params": groups["routing"], "lr": 1e-1}])
    losses = []
    for _ in range(8):
        with task_routing(ids):
            loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_adaptation_modes_set_what_trains():
    for mode, modules_train, routing_train in [("full", True, True), ("z", False, True), ("mu", True, False)]:
        model = tiny_t5()
        inject_adapters(model, AdapterConfig(method="poly", skills=3), num_tasks=7)
        assert prepare_adaptation(model, mode) == 0
        tables = routing_tables(model)
        assert all(t.num_tasks == 1 for t in tables.values())
        groups = adapter_param_groups(model)
        assert bool(groups["modules"]) == modules_train, mode
        assert bool(groups["routing"]) == routing_train, mode
    with pytest.raises(ValueError, match="no routing"):
        model = tiny_t5()
        inject_adapters(model, AdapterConfig(method="lora"), num_tasks=1)
        prepare_adaptation(model, "z")


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="'method' = 'polly'.*valid methods"):
        AdapterConfig(method="polly")
    with pytest.raises(ConfigError, match="'rank' = 0"):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError, match="'order' = 3.*orders 2 and 4"):
        AdapterConfig(method="tlora", order=3, layernorm=True)
    with pytest.raises(ConfigError, match="unknown key.*'skils'"):
        AdapterConfig.from_dict({"method": "poly", "skils": 3})
    with pytest.raises(ValueError, match="heads=3 must divide"):
        inject_adapters(tiny_t5(), AdapterConfig(method="mhr", heads=3), num_tasks=2)
