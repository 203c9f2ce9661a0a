"""What happens to a pretrained adapter for a new task: adaptation modes, collapse, merge."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tpds_common.errors import ConfigError

from .base import AdapterLinear
from .config import AdapterConfig
from .inject import CONFIG_ATTR, ROUTING_ATTR, adapter_config, adapter_layers, routing_tables
from .lora import LoRALinear
from .poly import PolyLinear
from .routing import RoutingTable

MODES = ("full", "z", "mu")


class ModeError(ConfigError):
    """The adaptation mode does not apply to this adapter (no routing, random routing, no collapse)."""


def check_mode(cfg: AdapterConfig, mode: str, source: str = "model") -> None:
    """Refuse an adaptation mode the adapter cannot run (cheap: call it before building the backbone)."""
    if mode not in MODES:
        raise ModeError(f"unknown adaptation mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not cfg.routed and mode != "full":
        raise ModeError(f"{source}: method {cfg.method!r} has no routing, so mode {mode!r} does not apply; use 'full'")
    if cfg.routing == "random" and mode != "mu":
        raise ModeError(
            f"{source}: adapter field 'routing' = 'random' (Random-mu): its routing was random and carries "
            f"no task information, so mode {mode!r} does not apply; use mode 'mu' (the uniform "
            "average of the modules; collapse=true turns Poly/MHR into one LoRA)"
        )


def prepare_adaptation(model: nn.Module, mode: str) -> int:
    """Set the model up to learn one new task and return its task id (0).

    full: a fresh routing row (U(+-1e-3)) and all module parameters train.
    z:    only the fresh routing row trains.
    mu:   routing fixed to uniform (1/S), module parameters train.
    Unrouted methods (LoRA, TLoRA, (IA)^3) only have `full`: all their parameters train.
    Random routing (Random-mu) only has `mu`: its allocations are fixed to the uniform average.
    """
    cfg = adapter_config(model)
    check_mode(cfg, mode)
    if not cfg.routed:
        return 0
    if cfg.routing == "random":
        for table in getattr(model, ROUTING_ATTR).values():
            table.uniform.fill_(True)
        return 0
    old_tables = routing_tables(model)
    new_tables: dict[str, RoutingTable] = {}
    by_old: dict[int, RoutingTable] = {}
    for key, old in old_tables.items():
        new = RoutingTable(
            1,
            old.heads,
            old.skills,
            gumbel=old.gumbel,
            temperature=old.temperature,
            straight_through=old.straight_through,
            normalise_dim=old.normalise_dim,
            device=old.logits.device,
            dtype=old.logits.dtype,
        )
        new.train(old.training)
        if mode == "mu":
            new.uniform.fill_(True)
        new.logits.requires_grad_(mode != "mu")
        new_tables[key] = new
        by_old[id(old)] = new
    setattr(model, ROUTING_ATTR, nn.ModuleDict(new_tables))
    for layer in adapter_layers(model).values():
        layer.attach_routing(by_old[id(layer.routing)])
        for pname, p in layer.named_parameters():
            if not pname.startswith("base.") and p.requires_grad:
                p.requires_grad_(mode != "z")
    return 0


def collapse_to_lora(model: nn.Module) -> nn.Module:
    """Poly/MHR under uniform routing (mode mu) are exactly one LoRA: A = mean_s A_s, B = mean_s B_s."""
    cfg = adapter_config(model)
    if cfg.method not in ("poly", "mhr"):
        raise ModeError(f"only Poly and MHR collapse into one LoRA, not {cfg.method!r}")
    lora_cfg = dataclasses.replace(cfg, method="lora", heads=1, routing="learned")
    for name, layer in adapter_layers(model).items():
        assert isinstance(layer, PolyLinear)
        a, b = layer.collapsed()
        lora = LoRALinear(layer.base, lora_cfg, layer.side, name)
        with torch.no_grad():
            lora.lora_a.copy_(a)
            lora.lora_b.copy_(b)
        lora.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lora)
    setattr(model, ROUTING_ATTR, nn.ModuleDict())
    object.__setattr__(model, CONFIG_ATTR, lora_cfg)
    return model


@torch.no_grad()
def merge_adapters(model: nn.Module, task_id: int = 0) -> nn.Module:
    """Fold task `task_id`'s adapter into the base weights and unwrap: the result is the plain model."""
    adapter_config(model)
    for name, layer in adapter_layers(model).items():
        weights = None
        if layer.routing is not None:
            was_training = layer.routing.training
            layer.routing.eval()  # merge the deterministic (evaluation) weights
            weights = layer.routing.weights(torch.tensor([task_id]))[0]
            layer.routing.train(was_training)
        layer.merge(weights)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    if hasattr(model, ROUTING_ATTR):
        delattr(model, ROUTING_ATTR)
    object.__setattr__(model, CONFIG_ATTR, None)
    return model


def mode_trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


__all__ = [
    "MODES",
    "ModeError",
    "check_mode",
    "prepare_adaptation",
    "collapse_to_lora",
    "merge_adapters",
    "AdapterLinear",
    "AdapterConfig",
    "mode_trainable_names",
]
