"""What the DeepSpeed engine actually does, as opposed to what its config asked for: the optimizer classes,
whether ZeRO offloads the optimizer and the parameters, and the dtypes of the parameters and the activations.
A run writes it to RUN_DIR/engine.json after its first step (tests check that bf16 and offload took effect)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ActivationDtype:
    """Records the dtype of the model's first forward output (its logits), then removes its hook."""

    def __init__(self, module: nn.Module):
        self.dtype: str | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output) -> None:
        logits = getattr(output, "logits", output)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if isinstance(logits, torch.Tensor):
            self.dtype = str(logits.dtype).removeprefix("torch.")
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _dtype_names(tensors) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})


def _param_tensors(module: nn.Module):
    # ZeRO-3 leaves an empty placeholder in .data; the rank's shard (the memory that is used) is ds_tensor
    for p in module.parameters():
        yield getattr(p, "ds_tensor", p)


def _master_partitions(zero_opt) -> list[torch.Tensor]:
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        found = getattr(zero_opt, name, None)
        if found:
            return [t for t in found if isinstance(t, torch.Tensor)]
    return []


def describe_engine(engine, activation_dtype: str | None) -> dict[str, Any]:
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    state = [
        v
        for s in getattr(inner, "state", {}).values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    ]
    trainable = [getattr(p, "ds_tensor", p) for p in engine.module.parameters() if p.requires_grad]
    return {
        "optimizer": type(zero_opt).__name__,
        "inner_optimizer": type(inner).__name__,
        # stage 3 names the flag offload_optimizer, stages 1-2 cpu_offload
        "offload_optimizer": bool(getattr(zero_opt, "offload_optimizer", getattr(zero_opt, "cpu_offload", False))),
        "offload_param": bool(getattr(zero_opt, "offload_param", False)),
        "master_weights": {
            "dtypes": _dtype_names(_master_partitions(zero_opt)),
            "devices": sorted({t.device.type for t in _master_partitions(zero_opt)}),
        },
        "optimizer_state": {"dtypes": _dtype_names(state), "devices": sorted({t.device.type for t in state})},
        "param_dtypes": _dtype_names(_param_tensors(engine.module)),
        "trainable_param_dtypes": _dtype_names(trainable),
        "activation_dtype": activation_dtype,
        "bf16_enabled": bool(engine.bfloat16_enabled()),
    }
