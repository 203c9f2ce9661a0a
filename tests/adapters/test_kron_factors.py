"""The Kronecker factor build of TLoRA / TensorPoly-I/II: recomputed in backward (exact, less memory), and
frozen LayerNorm affines that are no tensors (identity), with exports written when they were still loading."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from benchmarks.bench_adapters import saved_activation_bytes
from tensorpoly_ds.adapters import (
    AdapterConfig,
    ExportError,
    export_adapters,
    inject_adapters,
    load_adapters,
    task_routing,
)
from tensorpoly_ds.adapters.tlora import KronLayerNorm
from tests.adapters import test_behaviour as behaviour
from tests.conftest import tiny_t5

CASES = {
    "tlora_ln_frozen": dict(method="tlora", rank=2, tensor_rank=2, order=2, layernorm=True),
    "tensorpoly_i_ln_N2": dict(method="tensorpoly_i", rank=2, tensor_rank=3, order=2, layernorm=True),
    "tensorpoly_i_ln_N4": dict(method="tensorpoly_i", rank=2, tensor_rank=3, order=4, layernorm=True),
    "tensorpoly_i_ln_trainable": dict(
        method="tensorpoly_i", rank=2, tensor_rank=3, order=2, layernorm=True, layernorm_affine="trainable"
    ),
    "tensorpoly_ii_ln": dict(method="tensorpoly_ii", rank=2, tensor_rank=3, order=2, layernorm=True),
    "tensorpoly_ii_ln_gain": dict(
        method="tensorpoly_ii", rank=2, tensor_rank=3, order=2, layernorm=True, output_gain=True
    ),
    "tensorpoly_ii_paper": dict(
        method="tensorpoly_ii", rank=2, tensor_rank=3, order=2, tensorpoly_ii_semantics="paper"
    ),
}


def make_layer(key, d_in=20, d_out=12, dtype=torch.float64):
    return behaviour.make_layer(key, num_tasks=4, d_in=d_in, d_out=d_out, dtype=dtype, cfg=AdapterConfig(**CASES[key]))


def params_of(layer):
    return [p for n, p in layer.named_parameters() if p.requires_grad] + (
        [layer.routing.logits] if layer.routing is not None else []
    )


def forward_backward(layer, x, ids, recompute):
    layer.recompute_factors = recompute
    for p in params_of(layer):
        p.grad = None
    x = x.clone().requires_grad_(True)
    with task_routing(ids):
        out = layer(x)
    out.square().sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in params_of(layer)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", list(CASES))
def test_recomputed_factors_give_identical_outputs_and_gradients(key, dtype):
    layer = make_layer(key, dtype=dtype)
    x = torch.randn(5, 3, 20, dtype=dtype)
    ids = torch.tensor([0, 2, 0, 3, 1])
    plain = forward_backward(layer, x, ids, recompute=False)
    recomputed = forward_backward(layer, x, ids, recompute=True)
    assert torch.equal(plain[0], recomputed[0]) and torch.equal(plain[1], recomputed[1])
    assert len(plain[2]) == len(recomputed[2]) > 0
    for a, b in zip(plain[2], recomputed[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("key", list(CASES))
def test_recomputed_factors_float64_gradcheck(key):
    holder = behaviour._Holder(make_layer(key, d_in=10, d_out=7))  # small: gradcheck perturbs every entry
    assert holder.layer.recompute_factors
    names = [n for n, p in holder.named_parameters() if p.requires_grad and ".base." not in n]
    params = dict(holder.named_parameters())
    ids = torch.tensor([1, 3, 1])

    def forward(x, *values):
        with task_routing(ids):
            return torch.func.functional_call(holder, dict(zip(names, values)), (x,))

    x = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    # fast mode: random projections of the Jacobian instead of every entry (the same check, fewer passes)
    assert torch.autograd.gradcheck(forward, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_recomputation_keeps_the_factor_build_out_of_saved_memory():
    layer = make_layer("tensorpoly_i_ln_N2", d_in=400, d_out=400, dtype=torch.float32)  # q = 20, q^2 = 400
    x = torch.randn(2, 3, 400)
    ids = torch.tensor([0, 1])

    def run():
        with task_routing(ids):
            return layer(x).square().sum()

    layer.recompute_factors = False
    plain = saved_activation_bytes(run)
    layer.recompute_factors = True
    recomputed = saved_activation_bytes(run)
    products = 3 * 2 * 400 * 4  # one side's R x r x q^2 Kronecker products, fp32
    assert plain - recomputed >= 4 * products, (plain, recomputed)


def test_frozen_layernorm_affine_is_the_identity_and_holds_no_tensor():
    frozen, trainable = KronLayerNorm(3, 5, 2, trainable=False), KronLayerNorm(3, 5, 2, trainable=True)
    assert not list(frozen.parameters()) and not frozen.state_dict()
    x = torch.randn(4, 3, 25)
    assert torch.equal(frozen(x), F.layer_norm(x, (3, 25), torch.ones(3, 25), torch.zeros(3, 25)))
    assert torch.equal(frozen(x), trainable(x))
    model = tiny_t5()
    inject_adapters(model, AdapterConfig(**CASES["tensorpoly_i_ln_N2"]), num_tasks=2)
    assert not [n for n, _ in model.named_parameters() if ".norms." in n]


def _old_style_export(model, path):
    """What export_adapters wrote before frozen affines stopped being tensors: every KronLayerNorm's weight
    (ones) and bias (zeros) beside the trained tensors."""
    state = load_file(str(path / "adapter_model.safetensors"))
    for name, module in model.named_modules():
        if isinstance(module, KronLayerNorm):
            state[f"{name}.weight"] = torch.ones(module.shape)
            state[f"{name}.bias"] = torch.zeros(module.shape)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "1"})
    return state


@pytest.mark.parametrize("key", ["tensorpoly_i_ln_N2", "tensorpoly_i_ln_N4"])
def test_exports_without_and_with_the_old_frozen_constants_reload_identically(key, tmp_path):
    torch.manual_seed(1)
    model = tiny_t5()
    cfg = AdapterConfig(**CASES[key])
    inject_adapters(model, cfg, num_tasks=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    export_adapters(model, tmp_path / "new", tasks=["a", "b", "c"])
    assert not [k for k in load_file(str(tmp_path / "new" / "adapter_model.safetensors")) if ".norms." in k]
    export_adapters(model, tmp_path / "old", tasks=["a", "b", "c"])
    old = _old_style_export(model, tmp_path / "old")
    assert sum(".norms." in k for k in old) > 0
    x = torch.randint(2, 64, (3, 6))
    y = torch.randint(2, 64, (3, 4))
    with task_routing(torch.tensor([2, 0, 1])):
        expected = model(input_ids=x, labels=y).logits
    for name in ("new", "old"):
        torch.manual_seed(1)
        fresh = tiny_t5()
        load_adapters(fresh, tmp_path / name)
        with task_routing(torch.tensor([2, 0, 1])):
            assert torch.equal(fresh(input_ids=x, labels=y).logits, expected), name
    # a tensor under a frozen affine's name that is not its constant is refused, naming it
    victim = next(k for k in old if k.endswith(".norms.2.weight"))
    old[victim] = torch.full_like(old[victim], 2.0)
    save_file(old, str(tmp_path / "old" / "adapter_model.safetensors"), metadata={"format": "1"})
    with pytest.raises(ExportError, match=victim.replace(".", r"\.")):
        load_adapters(tiny_t5(), tmp_path / "old")


def test_factor_recomputation_switch_reaches_every_tlora_family_layer():
    from tensorpoly_ds.adapters import adapter_layers, set_factor_recomputation

    model = tiny_t5()
    inject_adapters(model, AdapterConfig(**CASES["tensorpoly_ii_ln"]), num_tasks=2)
    layers = adapter_layers(model).values()
    assert all(layer.recompute_factors for layer in layers)
    assert set_factor_recomputation(model, False) == len(layers) > 0
    assert not any(layer.recompute_factors for layer in layers)
