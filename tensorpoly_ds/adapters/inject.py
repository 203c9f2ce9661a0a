"""Injection of adapters into a Hugging Face seq2seq model by regular expressions over module names."""

from __future__ import annotations

import re

from torch import nn

from tpds_common.errors import ConfigError

from .base import AdapterLinear
from .config import AdapterConfig
from .ia3 import IA3Linear
from .lora import LoRALinear
from .poly import PolyLinear
from .routing import RandomRouting, RoutingTable
from .tensor_train import TensorPolyXLinear
from .tlora import TensorPolyIILinear, TensorPolyILinear, TLoRALinear

ADAPTER_CLASSES: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear,
    "tlora": TLoRALinear,
    "poly": PolyLinear,
    "mhr": PolyLinear,
    "tensorpoly_i": TensorPolyILinear,
    "tensorpoly_ii": TensorPolyIILinear,
    "tensorpoly_x": TensorPolyXLinear,
    "ia3": IA3Linear,
}

ROUTING_ATTR = "tpds_routing"
CONFIG_ATTR = "tpds_adapter_config"
_BLOCK = re.compile(r"(?:^|\.)(encoder|decoder)\.block\.(\d+)\.")


class InjectionError(ConfigError):
    """The adapter config does not fit the model (targets, routing granularity, task count, shared tables)."""


def module_side(name: str) -> str:
    """Which task ids a module uses: everything under the decoder (cross-attention included, whose
    keys and values see the encoder states repeated to the decoder batch) uses the decoder ids."""
    parts = name.split(".")
    return "decoder" if "decoder" in parts else "encoder"


def routing_key(name: str, cfg: AdapterConfig) -> str:
    """Which routing table a layer uses for the configured granularity."""
    if cfg.routing_granularity == "model":
        return "model"
    if cfg.routing_granularity == "layer":
        return name.replace(".", "__")
    match = _BLOCK.search(name)
    if match is None:
        raise InjectionError(
            f"{name}: routing granularity {cfg.routing_granularity!r} needs module names "
            "of the form '(encoder|decoder).block.<i>.' "
        )
    stack, block = match.group(1), int(match.group(2))
    if cfg.routing_granularity == "block":
        return f"{stack}__block{block}"
    return f"{stack}__group{block // cfg.routing_group_size}"


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def inject_adapters(model: nn.Module, cfg: AdapterConfig, num_tasks: int) -> nn.Module:
    """Wrap every nn.Linear whose name matches cfg.target_regex; freeze everything else."""
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("model already has adapters injected")  # a caller bug, not a config
    if cfg.routed and num_tasks < 1:
        raise InjectionError(f"routed method {cfg.method!r} needs num_tasks >= 1, got {num_tasks}")
    pattern = re.compile(cfg.target_regex)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, AdapterLinear) and pattern.search(name)
    ]
    if not targets:
        raise InjectionError(f"no nn.Linear module matches targets {cfg.target_regex!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    cls = ADAPTER_CLASSES[cfg.method]
    tables: dict[str, RoutingTable | RandomRouting] = {}
    for name, linear in targets:
        layer = cls(linear, cfg, module_side(name), name)
        if cfg.routed:
            key = routing_key(name, cfg)
            heads, skills = layer.routing_shape
            table = tables.get(key)
            if table is None and cfg.routing == "random":
                table = tables[key] = RandomRouting(
                    num_tasks, heads, skills, normalise_dim=layer.routing_normalise_dim, device=linear.weight.device
                )
            elif table is None:
                table = RoutingTable(
                    num_tasks,
                    heads,
                    skills,
                    gumbel=cfg.gumbel,
                    temperature=cfg.temperature,
                    straight_through=cfg.straight_through,
                    normalise_dim=layer.routing_normalise_dim,
                    device=linear.weight.device,
                    dtype=linear.weight.dtype,
                )
                tables[key] = table
            elif (table.heads, table.skills) != (heads, skills):
                raise InjectionError(
                    f"{name}: shared routing table {key!r} has shape "
                    f"{(table.heads, table.skills)} but this layer needs {(heads, skills)}"
                )
            layer.attach_routing(table)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    setattr(model, ROUTING_ATTR, nn.ModuleDict(tables))
    object.__setattr__(model, CONFIG_ATTR, cfg)  # plain attribute: not a module, not in state_dict
    # Everything the adapters own trains (frozen LayerNorm affines are no parameters: tlora.KronLayerNorm).
    for layer in adapter_layers(model).values():
        for pname, p in layer.named_parameters():
            if not pname.startswith("base."):
                p.requires_grad_(True)
    for table in tables.values():
        for p in table.parameters():
            p.requires_grad_(True)
    return model


def adapter_config(model: nn.Module) -> AdapterConfig:
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError("model has no adapters; call inject_adapters first")  # a caller bug
    return cfg


def routing_tables(model: nn.Module) -> dict[str, RoutingTable]:
    """The learned routing tables (logits per task); random routing (Random-mu) has none."""
    bank = getattr(model, ROUTING_ATTR, None)
    return {k: t for k, t in bank.items() if isinstance(t, RoutingTable)} if bank is not None else {}


def adapter_param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split into adapter modules and routing logits (separate learning rates)."""
    routing = [t.logits for t in routing_tables(model).values() if t.logits.requires_grad]
    routing_ids = {id(p) for p in routing}
    modules = [p for p in model.parameters() if p.requires_grad and id(p) not in routing_ids]
    return {"modules": modules, "routing": routing}


def register_external_routing_params(model: nn.Module) -> int:
    """Under ZeRO-3 a layer only gathers its own parameters; shared routing tables live in
    model.tpds_routing, so each layer must declare the table it reads as an external parameter."""
    from deepspeed.runtime.zero import register_external_parameter

    count = 0
    for layer in adapter_layers(model).values():
        if isinstance(layer.routing, RoutingTable):
            register_external_parameter(layer, layer.routing.logits)
            count += 1
    return count
