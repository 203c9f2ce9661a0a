"""Random-mu (routing: random): binary per-example allocations in training, the uniform average outside it."""

import math
import random

import pytest
import torch
from torch import nn

from tensorpoly_ds.adapters import (
    AdapterConfig,
    ConfigError,
    ModeError,
    RandomRouting,
    collapse_to_lora,
    export_adapters,
    inject_adapters,
    load_adapters,
    prepare_adaptation,
    routing_tables,
    task_routing,
)
from tensorpoly_ds.adapters.inject import ADAPTER_CLASSES
from tests.adapters.test_behaviour import ALL, UNROUTED
from tests.conftest import tiny_t5

ROUTED = {k: v for k, v in ALL.items() if k not in UNROUTED}


def cfg_for(key, **extra):
    kw = dict(ROUTED[key])
    method = kw.pop("method", key)
    return AdapterConfig(method=method, routing="random", **kw, **extra)


def make_layer(key, training, d_in=8, d_out=6):
    """A layer with its (detached) random routing, both in training or evaluation mode."""
    cfg = cfg_for(key)
    mod = ADAPTER_CLASSES[cfg.method](nn.Linear(d_in, d_out).double(), cfg, "encoder", key)
    heads, skills = mod.routing_shape
    mod.attach_routing(RandomRouting(4, heads, skills, normalise_dim=mod.routing_normalise_dim))
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if not name.startswith("base."):
                p.add_(0.3 * torch.randn_like(p))
    mod.train(training), mod.routing.train(training)
    return mod


def drawn(mod, x, ids):
    with task_routing(ids):
        return mod.task_weights(x)


@pytest.mark.parametrize("key", list(ROUTED))
def test_training_allocation_is_binary_per_example_and_ignores_the_task(key):
    mod = make_layer(key, training=True)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    dim = mod.routing_normalise_dim
    random.seed(7)
    weights, inverse = drawn(mod, x, torch.tensor([0, 1, 2, 3, 0]))
    assert weights.shape == (5, *mod.routing_shape) and torch.equal(inverse, torch.arange(5))
    active = weights > 0
    count = active.sum(dim=dim, keepdim=True)
    assert (count >= 1).all()
    torch.testing.assert_close(weights, active.float() / count)  # 1/|subset| on the subset, 0 elsewhere
    random.seed(7)
    same_seed_other_tasks, _ = drawn(mod, x, torch.tensor([3, 3, 3, 3, 3]))
    torch.testing.assert_close(same_seed_other_tasks, weights)  # the task plays no part
    again, _ = drawn(mod, x, torch.tensor([0, 1, 2, 3, 0]))
    assert not torch.equal(again, weights)  # a fresh draw per forward pass


def test_subsets_are_uniform_over_the_non_empty_ones():
    """Fair coins conditioned on a non-empty subset: each module is in with probability 2^(n-1) / (2^n - 1)."""
    from tensorpoly_ds.adapters.routing import random_allocation

    gen = torch.Generator().manual_seed(0)
    w = random_allocation(20000, 1, 3, -1, gen)[:, 0]
    codes = ((w > 0).long() * torch.tensor([1, 2, 4])).sum(-1)
    freq = torch.bincount(codes, minlength=8).float() / len(codes)
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], torch.full((7,), 1 / 7), atol=0.01, rtol=0)


@pytest.mark.parametrize("key", list(ROUTED))
def test_outside_training_the_weights_are_uniform(key):
    mod = make_layer(key, training=False)
    weights, inverse = drawn(mod, torch.randn(3, 8, dtype=torch.float64), torch.tensor([0, 1, 2]))
    n = weights.shape[mod.routing_normalise_dim]
    assert inverse is None and weights.shape == (1, *mod.routing_shape)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / n))


def explicit_uniform_delta(mod, key):
    """The dense delta [in, out] of the uniform average, written out per method without the mixing code."""
    if key in ("poly", "mhr"):
        a = mod.lora_a.mean(0)  # [h, in/h, r]
        b = mod.lora_b.mean(0)  # [h, r, out/h]
        a = a.reshape(-1, a.shape[-1])
        b = b.permute(1, 0, 2).reshape(b.shape[1], -1)
        return a @ b * mod.scale
    if key == "tensorpoly_i":
        return mod.side_a.terms().mean(0).t() @ mod.side_b.terms().mean(0) * mod.scale
    if key == "tensorpoly_i_gain":
        return mod.side_a.terms().mean(0).t() @ mod.side_b.terms().mean(0) * mod.scale * mod.output_gain
    if key == "tensorpoly_ii":  # kron of the order-wise mean leaves

        def side(s):
            mean = s.leaves.mean(1)  # [N, r, q]
            cols = torch.stack([torch.kron(mean[0, c], mean[1, c]) for c in range(mean.shape[1])])
            return cols[:, : s.dim]

        return side(mod.side_a).t() @ side(mod.side_b) * mod.scale
    if key == "tensorpoly_ii_paper":  # weights 1/N on each order: (1/N)^N per term
        n = mod.cfg.order
        return mod.side_a.terms().sum(0).t() @ mod.side_b.terms().sum(0) * mod.scale * (1 / n**n) ** 2
    if key == "tensorpoly_x":  # every bond scaled by 1/R on each of N cores
        ones = torch.ones(mod.cfg.order, mod.cfg.tensor_rank, dtype=torch.float64)
        return mod.dense(ones[None])[0] / mod.cfg.tensor_rank**mod.cfg.order
    raise AssertionError(key)


@pytest.mark.parametrize("key", list(ROUTED))
def test_eval_output_is_the_explicit_uniform_average_of_the_modules(key):
    mod = make_layer(key, training=False)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    with task_routing(torch.tensor([0, 3, 1])):
        out = mod(x)
    torch.testing.assert_close(out, mod.base(x) + x @ explicit_uniform_delta(mod, key))


@pytest.mark.parametrize("key", list(ROUTED))
def test_gradients_reach_only_the_allocated_modules(key):
    mod = make_layer(key, training=True)
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    seed = next(s for s in range(100) if (random.seed(s) or (drawn(mod, x, 2)[0] == 0).any()))  # leaves one out
    random.seed(seed)
    with task_routing(torch.tensor([2])):
        weights, _ = mod.task_weights(x)
        mod(x).pow(2).sum().backward()
    w = weights[0]  # [heads, skills] (or [N, R])
    assert (w == 0).any() and (w > 0).any()
    if key in ("poly", "mhr"):
        grads = [mod.lora_a.grad.abs().sum(dim=(2, 3)), mod.lora_b.grad.abs().sum(dim=(2, 3))]  # [skills, heads]
        for g in grads:
            assert torch.equal(g.t() == 0, w == 0)
    elif key in ("tensorpoly_i",):
        for side in (mod.side_a, mod.side_b):
            g = side.leaves.grad.abs().sum(dim=(0, 2, 3))  # [R]
            assert torch.equal(g == 0, w[0] == 0)
    elif key == "tensorpoly_ii":
        for side in (mod.side_a, mod.side_b):
            g = side.leaves.grad.abs().sum(dim=(2, 3))  # [N, R]
            assert torch.equal(g == 0, w == 0)
    elif key == "tensorpoly_ii_paper":  # a term k is active only if every order allocates it
        for side in (mod.side_a, mod.side_b):
            g = side.leaves.grad.abs().sum(dim=(0, 2, 3))
            assert torch.equal(g == 0, (w == 0).any(dim=0))
    elif key == "tensorpoly_x":  # core n's outgoing bond k carries weight w[n, k]
        for n, core in enumerate(mod.cores):
            g = core.grad.abs().sum(dim=(0, 1, 2))  # [R]
            assert torch.equal(g == 0, w[n] == 0)


def test_no_routing_parameters_and_config_errors():
    model = tiny_t5()
    inject_adapters(model, cfg_for("mhr"), num_tasks=5)
    assert not routing_tables(model)
    assert not [n for n, _ in model.named_parameters() if "tpds_routing" in n]
    with pytest.raises(ConfigError, match="'routing' = 'random'.*'lora' has no routing"):
        AdapterConfig(method="lora", routing="random")
    with pytest.raises(ConfigError, match="'routing' = 'randm'.*learned, random"):
        AdapterConfig(method="poly", routing="randm")
    with pytest.raises(ConfigError, match="'gumbel'"):
        AdapterConfig(method="poly", routing="random", gumbel=True)
    with pytest.raises(ConfigError, match="'skills' = 63"):
        AdapterConfig(method="poly", routing="random", skills=63)


def test_params_cli_counts_no_routing(capsys):
    import json

    from launch.cli import main as cli_main

    assert cli_main(["params", "--model", "t0-3b", "--method", "poly", "--routing", "random", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["multi_task"] == {"modules": 17_694_720, "routing": 0, "total": 17_694_720}
    assert report["routing_tables"] == 0
    assert report["adaptation"] == {"mu": 17_694_720, "mu_collapsed": 2_211_840}


def backbone():
    torch.manual_seed(1)  # the same backbone every time, as a real checkpoint would be
    return tiny_t5()


def trained_random_model(key="poly", **cfg_extra):
    model = backbone()
    inject_adapters(model, cfg_for(key, **cfg_extra), num_tasks=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("key", ["poly", "tensorpoly_x"])
def test_export_reload_and_mu_adaptation(tmp_path, key):
    model = trained_random_model(key)
    export_adapters(model, tmp_path / "export", tasks=["a", "b", "c", "d"])
    fresh = backbone()
    meta = load_adapters(fresh, tmp_path / "export")
    assert meta["adapter"]["routing"] == "random" and not [k for k in meta["tensors"] if k.endswith(".logits")]
    x, y = torch.randint(2, 64, (3, 6)), torch.randint(2, 64, (3, 4))
    model.eval(), fresh.eval()
    with task_routing(torch.tensor([0, 1, 3])):
        expected = model(input_ids=x, labels=y).logits
        torch.testing.assert_close(fresh(input_ids=x, labels=y).logits, expected)
    for mode in ("full", "z"):
        with pytest.raises(ModeError, match="Random-mu.*mode 'mu'"):
            prepare_adaptation(fresh, mode)
    prepare_adaptation(fresh, "mu")
    fresh.train()  # adaptation trains: the weights stay uniform
    with task_routing(0):
        torch.testing.assert_close(fresh(input_ids=x, labels=y).logits, expected)
    opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(5):
        with task_routing(0):
            loss = fresh(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    export_adapters(fresh, tmp_path / "adapted", tasks=["new"])  # the adapted adapter reloads as uniform
    again = backbone()
    load_adapters(again, tmp_path / "adapted")
    again.train(), fresh.train()
    with task_routing(0):
        torch.testing.assert_close(again(input_ids=x, labels=y).logits, fresh(input_ids=x, labels=y).logits)


def test_mu_collapse_of_a_random_poly_equals_its_eval_output():
    model = trained_random_model("mhr").eval()
    x, y = torch.randint(2, 64, (2, 6)), torch.randint(2, 64, (2, 3))
    with task_routing(torch.tensor([1, 2])):
        expected = model(input_ids=x, labels=y).logits
    prepare_adaptation(model, "mu")
    collapse_to_lora(model)
    assert model.tpds_adapter_config.method == "lora" and model.tpds_adapter_config.routing == "learned"
    with task_routing(0):
        torch.testing.assert_close(model(input_ids=x, labels=y).logits, expected)


def test_one_allocation_per_example_for_layers_sharing_a_table():
    """Granularity 'model': every layer reads the same allocation of an example within a forward pass."""
    model = trained_random_model("poly", routing_granularity="model").train()
    seen = []
    for layer in [m for m in model.modules() if hasattr(m, "task_weights")][:3]:
        layer.register_forward_hook(lambda mod, args, out: seen.append(mod.task_weights(args[0])[0]))
    with task_routing(torch.tensor([0, 1])):
        model(input_ids=torch.randint(2, 64, (2, 5)), labels=torch.randint(2, 64, (2, 3)))
    assert len(seen) == 3 and all(torch.equal(w, seen[0]) for w in seen)
    assert math.isclose(float(seen[0].sum()), 2.0)


def test_adaptation_job_refuses_full_and_z_before_building_the_backbone(tmp_path, monkeypatch):
    from tensorpoly_ds.adapt import job as job_module

    export_adapters(trained_random_model("poly"), tmp_path / "export", tasks=["a", "b", "c", "d"])

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built before the mode was checked")

    monkeypatch.setattr(job_module, "build_backbone", no_backbone)
    for mode in ("full", "z"):
        job = job_module.AdaptJob(
            out_dir=str(tmp_path / mode), data_dir=str(tmp_path), task="t", mode=mode, export=str(tmp_path / "export")
        )
        with pytest.raises(ModeError, match=rf"{tmp_path / 'export'}: adapter field 'routing' = 'random'"):
            job_module.setup_model(job, vocab_size=64)
    job = job_module.AdaptJob(
        out_dir=str(tmp_path / "mu"), data_dir=str(tmp_path), task="t", mode="mu", export=str(tmp_path / "export")
    )
    with pytest.raises(AssertionError, match="backbone was built"):
        job_module.setup_model(job, vocab_size=64)
    assert job_module.method_label(job, AdapterConfig(method="poly", routing="random")) == "Random-mu (Poly)"
