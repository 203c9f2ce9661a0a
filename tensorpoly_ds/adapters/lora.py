"""LoRA: h = W0 x + (alpha / r) * B(A x); A ~ U(+-1/sqrt(3 in)), B = 0 at init."""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLinear, apply_low_rank, reference_bound, uniform_
from .config import AdapterConfig


class LoRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, cfg: AdapterConfig, side: str, name: str) -> None:
        super().__init__(base, cfg, side, name)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(self.in_features, cfg.rank, **kw))
        self.lora_b = nn.Parameter(torch.zeros(cfg.rank, self.out_features, **kw))
        uniform_(self.lora_a, reference_bound(cfg, self.in_features))
        self.scale = cfg.alpha / cfg.rank

    def delta_from_weights(self, x, weights, inverse):
        return apply_low_rank(x, self.lora_a, self.lora_b, None, self.scale)

    def delta_weight(self, weights=None):
        return self.lora_a @ self.lora_b * self.scale
