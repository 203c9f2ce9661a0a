"""Adapter health: how large each adapter's output is next to its frozen layer's, and its gradient norms.

While `recording()` is on, every adapted layer adds ||delta W x||^2 and ||W0 x + b||^2 (summed over the rows
and positions of its input, padding included) to a two-entry float32 tensor of its own: detached, no graph,
no host sync. `take_sums` stacks and resets them once per step. The ratio of a layer is
sqrt(sum ||delta W x||^2) / sqrt(sum ||W0 x + b||^2) over the step's batch (all micro-batches and, once the
sums are all-reduced, all ranks). Only forward passes run under `recording()` count: activation
checkpointing's recomputation in backward runs outside it and is not counted twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

_RECORDING = [False]

# layer groups, by the T5 projection names (anything else: "<side>_other")
_KINDS = (("SelfAttention", "self_attention"), ("EncDecAttention", "cross_attention"), ("DenseReluDense", "ffn"))


@contextlib.contextmanager
def recording(enabled: bool = True) -> Iterator[None]:
    previous = _RECORDING[0]
    _RECORDING[0] = enabled
    try:
        yield
    finally:
        _RECORDING[0] = previous


def is_recording() -> bool:
    return _RECORDING[0]


def _norm(t: torch.Tensor) -> torch.Tensor:
    """The 2-norm of t in at least float32 (bf16 activations: no bf16 sum of squares), as float32."""
    return torch.linalg.vector_norm(t.detach(), dtype=torch.promote_types(t.dtype, torch.float32)).float()


def record(layer, base_out: torch.Tensor, delta: torch.Tensor) -> None:
    """Add this forward's squared norms of delta W x and W0 x to layer.health_sums."""
    with torch.no_grad():
        sums = torch.stack([_norm(delta).square(), _norm(base_out).square()])
    layer.health_sums = sums if layer.health_sums is None else layer.health_sums + sums


def take_sums(layers: dict) -> torch.Tensor | None:
    """[layers, 2] (delta, base) squared norms recorded since the last call, in the order of `layers` (zeros for
    a layer the forward did not reach); resets them. None when nothing was recorded."""
    sums = [layer.health_sums for layer in layers.values()]
    for layer in layers.values():
        layer.health_sums = None
    recorded = next((s for s in sums if s is not None), None)
    if recorded is None:
        return None
    return torch.stack([recorded.new_zeros(2) if s is None else s for s in sums])


def layer_group(name: str) -> str:
    """'decoder.block.1.layer.1.EncDecAttention.q' -> 'decoder_cross_attention'."""
    side = "decoder" if "decoder" in name.split(".") else "encoder"
    kind = next((k for marker, k in _KINDS if marker in name), "other")
    return f"{side}_{kind}"


def ratio_metrics(names: list[str], sums: torch.Tensor) -> dict[str, float]:
    """train/delta_ratio/mean (mean of the per-layer ratios) and train/delta_ratio/<group> (mean over the
    group's layers) from the [layers, 2] squared norms (already summed over ranks); layers without input
    (base norm 0: not reached) are left out."""
    ratios = (sums[:, 0].double().sqrt() / sums[:, 1].double().sqrt()).tolist()
    kept = [(name, r) for name, r, base in zip(names, ratios, sums[:, 1].tolist()) if base > 0]
    out = {"train/delta_ratio/mean": sum(r for _, r in kept) / len(kept) if kept else float("nan")}
    groups: dict[str, list[float]] = {}
    for name, r in kept:
        groups.setdefault(layer_group(name), []).append(r)
    for group, values in sorted(groups.items()):
        out[f"train/delta_ratio/{group}"] = sum(values) / len(values)
    return out


def _local_grad(p: torch.nn.Parameter) -> tuple[torch.Tensor | None, bool]:
    """(the gradient this rank holds for p, whether it is a partition: ZeRO-1/2/3 and DeepSpeed's bf16
    optimizer keep a slice per rank; otherwise every rank holds the same, reduced, full gradient)."""
    if hasattr(p, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(p), True
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer: this rank's fragment, if any
        mapping = p._hp_mapping
        if mapping is None:
            return None, True
        fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if fragment.numel() == p.numel() and address.numel != p.numel():  # bf16: a full buffer on each rank
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment, True
    return p.grad, False


def grad_square_sums(groups: dict[str, list[torch.nn.Parameter]], rank: int, device) -> torch.Tensor:
    """[groups] this rank's share of the squared gradient norm of each group (float64, on `device`): summed over
    ranks, the squared norm of the full gradient. Call on every rank after the backward of the step's last
    micro-batch and before the optimizer step (DeepSpeed frees the reduced gradients in its step)."""
    out = []
    for params in groups.values():
        norms = []
        for p in params:
            grad, partitioned = _local_grad(p)
            if grad is not None and (partitioned or rank == 0):  # a replicated gradient counts once
                norms.append(_norm(grad).to(device))
        out.append(
            torch.stack(norms).double().square().sum() if norms else torch.zeros((), dtype=torch.float64, device=device)
        )
    return torch.stack(out)


def grad_metrics(names: list[str], square_sums: torch.Tensor) -> dict[str, float]:
    return {f"train/adapter_grad_norm/{name}": math.sqrt(max(float(v), 0.0)) for name, v in zip(names, square_sums)}


__all__ = [
    "grad_metrics",
    "grad_square_sums",
    "is_recording",
    "layer_group",
    "ratio_metrics",
    "record",
    "recording",
    "take_sums",
]
