"""(IA)^3: a learned vector (init 1) rescales the layer's output (keys, values, FFN hidden)."""

from __future__ import annotations

import torch
from torch import nn

from . import health
from .base import AdapterLinear
from .config import AdapterConfig


class IA3Linear(AdapterLinear):
    def __init__(self, base: nn.Linear, cfg: AdapterConfig, side: str, name: str) -> None:
        super().__init__(base, cfg, side, name)
        self.ia3_scale = nn.Parameter(torch.ones(self.out_features, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        if health.is_recording():
            health.record(self, out, out * (self.ia3_scale.to(out.dtype) - 1))
        return out * self.ia3_scale.to(out.dtype)

    @torch.no_grad()
    def merge(self, weights=None) -> None:
        self.base.weight *= self.ia3_scale[:, None].to(self.base.weight.dtype)
        if self.base.bias is not None:
            self.base.bias *= self.ia3_scale.to(self.base.bias.dtype)
        self.merged = True

    def delta_weight(self, weights=None):
        return (self.base.weight * (self.ia3_scale[:, None] - 1)).t()
