"""Poly and MHR: S LoRA skills mixed per task by routing weights; MHR routes h blocks separately.

MHR splits A's input rows and B's output columns into h blocks, each with its own weights over
the S skills; Poly is the case h = 1.
"""

from __future__ import annotations

import torch
from torch import nn

from tpds_common.errors import ConfigError

from .base import AdapterLinear, MixedLowRank, reference_bound, uniform_
from .config import AdapterConfig


class PolyLinear(MixedLowRank, AdapterLinear):
    def __init__(self, base: nn.Linear, cfg: AdapterConfig, side: str, name: str) -> None:
        super().__init__(base, cfg, side, name)
        h = cfg.heads
        if self.in_features % h or self.out_features % h:
            raise ConfigError(
                f"{name}: adapter field 'heads': MHR heads={h} must divide "
                f"in_features={self.in_features} and out_features={self.out_features}"
            )
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(cfg.skills, h, self.in_features // h, cfg.rank, **kw))
        self.lora_b = nn.Parameter(torch.zeros(cfg.skills, h, cfg.rank, self.out_features // h, **kw))
        uniform_(self.lora_a, reference_bound(cfg, self.in_features))
        self.scale = cfg.alpha / cfg.rank
        self.routing_shape = (h, cfg.skills)

    def mixed(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A [u, in, r] and B [u, r, out] for weights [u, heads, skills]."""
        w = weights.to(self.lora_a.dtype)
        a = torch.einsum("uhs,shir->uhir", w, self.lora_a).reshape(w.shape[0], self.in_features, -1)
        b = torch.einsum("uhs,shro->urho", w, self.lora_b).reshape(w.shape[0], -1, self.out_features)
        return a, b

    def collapsed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single LoRA (A, B) that uniform routing computes: the mean of the skills."""
        uniform = torch.full(
            (1, self.cfg.heads, self.cfg.skills),
            1.0 / self.cfg.skills,
            dtype=self.lora_a.dtype,
            device=self.lora_a.device,
        )
        a, b = self.mixed(uniform)
        return a[0], b[0]
