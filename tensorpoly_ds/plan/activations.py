"""Activation memory of one micro-batch, measured on the meta device: the engine's loss runs forward on a
model without storage while a saved-tensors hook records every tensor autograd keeps for backward.

This measures what the model's own code saves (attention scores, FFN hidden states, adapter products, the
float32 logits of the loss) instead of a formula that would drift from it. Storages are counted once (views
share them) and parameters are not activations. Saved tensors are attributed to the transformer block that
was running, which gives the checkpointed footprint too: with per-block activation checkpointing only the
blocks' inputs stay alive, plus what the loss and the head keep until their backward has run, then one
block's activations at a time while it is recomputed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tpds_common.errors import ConfigError

ATTENTION_KERNELS = ("cuda", "cpu", "math")


@dataclass(frozen=True)
class ActivationProfile:
    outside_blocks: int  # bytes saved outside the transformer blocks (embeddings, final norm, logits, loss)
    blocks: tuple[int, ...]  # bytes saved inside each block
    block_inputs: int  # bytes of the distinct tensors passed into blocks (kept by checkpointing)
    linear_weights_saved: int  # elements of frozen nn.Linear weights autograd keeps for backward
    largest_tensor: int  # bytes of the largest saved tensor (its gradient is the backward's workspace)

    @property
    def without_checkpointing(self) -> int:
        return self.outside_blocks + sum(self.blocks)

    @property
    def with_checkpointing(self) -> int:
        """Peak with per-block checkpointing: the blocks' inputs, plus the larger of what the loss and the head
        keep (their backward runs first) and one recomputed block (afterwards)."""
        return self.block_inputs + max(self.outside_blocks, self.largest_block)

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers activation checkpointing wraps: the items of the outermost ModuleLists of blocks
    (T5: encoder.block and decoder.block, not the sub-layer lists inside a block)."""
    blocks: list[nn.Module] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(p) for p in prefixes):
            continue
        items = [(f"{name}.{i}", block) for i, block in enumerate(module) if any(True for _ in block.parameters())]
        if len(items) > 1:
            blocks.extend(block for _, block in items)
            prefixes.extend(f"{n}." for n, _ in items)
    return blocks


@contextlib.contextmanager
def attention_kernel(kind: str) -> Iterator[None]:
    """Make scaled_dot_product_attention run the fused kernel the target device would pick, whose saved
    tensors differ from the math path a meta tensor would otherwise take (which keeps the b x h x L x L
    probabilities). T5 passes its position bias as a float mask, which CUDA's flash kernel cannot take: CUDA
    runs the memory-efficient kernel; CPUs run their flash kernel. "math": no substitution."""
    if kind not in ATTENTION_KERNELS:
        raise ConfigError(f"attention kernel {kind!r}: valid: {', '.join(ATTENTION_KERNELS)}")
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if kwargs.get("enable_gqa") or query.shape[1] != key.shape[1]:
            return original(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
            )
        if kind == "cuda":
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, torch.is_grad_enabled(), dropout_p, is_causal, scale=scale
            )[0]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    if kind != "math":
        functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def profile_activations(
    model: nn.Module, loss_fn, batch: dict, *, task_ids: torch.Tensor | None, attention: str = "cuda"
) -> ActivationProfile:
    """Run `loss_fn(model, batch)` once (inside task_routing(task_ids) for routed adapters) and attribute the
    saved tensors; `model` and `batch` live on the meta device (or any device: the records are the same).
    `attention`: the fused attention kernel of the device to plan for (see attention_kernel)."""
    from tensorpoly_ds.adapters import task_routing

    params = {_storage_key(p) for p in model.parameters()}
    linear_weights = {
        _storage_key(m.weight): m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad
    }
    blocks = transformer_blocks(model)
    current: list[int] = []
    # Storages are told apart by address, and each one recorded is held (the values below) until the end: one
    # freed during the pass (a temporary passed into a block, a saved tensor of a discarded branch) could
    # otherwise hand its address to a new storage, which would then go uncounted, by an amount that depends on
    # the allocator.
    saved: dict[int, tuple[int, torch.UntypedStorage]] = {}  # address -> (block index or -1, storage)
    weights_saved: set[int] = set()
    inputs: dict[int, torch.UntypedStorage] = {}  # address -> storage passed into a block

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key in linear_weights:
            weights_saved.add(key)
        if key not in params and key not in saved:
            saved[key] = (current[-1] if current else -1, t.untyped_storage())
        return t

    def enter(index: int):
        def hook(module, args, kwargs):
            current.append(index)
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and _storage_key(value) not in params:
                    inputs.setdefault(_storage_key(value), value.untyped_storage())

        return hook

    def leave(module, args, output):
        current.pop()

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), attention_kernel(attention):
            if task_ids is None:
                loss_fn(model, batch)
            else:
                with task_routing(task_ids):
                    loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    per_block = [0] * len(blocks)
    outside = 0
    for index, storage in saved.values():
        if index < 0:
            outside += storage.nbytes()
        else:
            per_block[index] += storage.nbytes()
    outside_keys = {k for k, (index, _) in saved.items() if index < 0}
    return ActivationProfile(
        outside_blocks=outside,
        blocks=tuple(per_block),
        block_inputs=sum(s.nbytes() for k, s in inputs.items() if k not in outside_keys),
        linear_weights_saved=sum(linear_weights[k] for k in weights_saved),
        largest_tensor=max((s.nbytes() for _, s in saved.values()), default=0),
    )
