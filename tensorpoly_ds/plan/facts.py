"""The facts a memory plan needs, gathered on the meta device: parameter tensors (frozen and trainable, with
the adapters injected exactly as the engine injects them), the largest module and the activations of one
micro-batch of the engine's loss."""

from __future__ import annotations

import torch
from torch import nn

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters, routing_tables

from .activations import profile_activations
from .memory import ModelFacts

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def meta_model(config, adapter: AdapterConfig | None, num_tasks: int) -> nn.Module:
    """Backbone + adapters on the meta device, trainable exactly as in training (FullFT: everything)."""
    from tensorpoly_ds.models import build_meta_model

    model = build_meta_model(config)
    if adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    inject_adapters(model, adapter, num_tasks)
    for table in routing_tables(model).values():
        # a real flag: the router reads it with bool(), which a meta tensor cannot answer
        table.uniform = torch.zeros((), dtype=torch.bool)
    return model


def meta_batch(micro_batch: int, input_len: int, target_len: int) -> dict:
    """A batch of the engine's layout without padding (no attention mask: padding adds masks of b x L)."""
    return {
        "input_ids": torch.zeros(micro_batch, input_len, dtype=torch.long, device="meta"),
        "attention_mask": None,
        "labels": torch.zeros(micro_batch, target_len, dtype=torch.long, device="meta"),
    }


def gather_facts(
    config,
    adapter: AdapterConfig | None,
    num_tasks: int,
    *,
    micro_batch: int,
    input_len: int,
    target_len: int,
    activation_dtypes: tuple[str, ...] = ("bf16",),
    attention: str = "cuda",
) -> ModelFacts:
    from tensorpoly_ds.engine.trainer import lm_loss

    model = meta_model(config, adapter, num_tasks)
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    # one id per row (up to the task count): the worst case of distinct tasks in a batch
    task_ids = torch.arange(micro_batch) % max(1, num_tasks) if adapter is not None and adapter.routed else None
    profiles = {}
    model.train()
    for name in activation_dtypes:
        model.to(DTYPES[name])
        profiles[name] = profile_activations(
            model, lm_loss, meta_batch(micro_batch, input_len, target_len), task_ids=task_ids, attention=attention
        )
    return ModelFacts(
        frozen_numels=tuple(p.numel() for p in params if not p.requires_grad),
        trainable_shapes=tuple(tuple(p.shape) for p in params if p.requires_grad),
        largest_module=largest,
        activations=profiles,
    )
