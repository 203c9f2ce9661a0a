"""The interface every adapter shares: it wraps a frozen nn.Linear and adds a task-dependent delta."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import health
from .config import AdapterConfig
from .routing import RandomRouting, RoutingTable, current_task_groups


def uniform_(tensor: torch.Tensor, bound: float) -> torch.Tensor:
    # Parameters built on the meta device (parameter accounting) have no storage to fill.
    if tensor.device.type != "meta":
        with torch.no_grad():
            tensor.uniform_(-bound, bound)
    return tensor


def reference_bound(cfg: AdapterConfig, in_features: int) -> float:
    """The reference init: U(+-1/sqrt(3 * in_features)) unless overridden."""
    return cfg.init_scale if cfg.init_scale is not None else 1.0 / math.sqrt(3 * in_features)


class AdapterLinear(nn.Module):
    """Wraps `base` (kept frozen); `side` says which task ids apply ('encoder' or 'decoder').

    Routed subclasses implement `delta_from_weights(x, weights, inverse)` where `weights` holds the
    mixing weights of the distinct tasks in the batch and `inverse` maps each row to one of them, so
    the adapter is mixed once per distinct task and applied with batched products.
    """

    routing_shape: tuple[int, int] | None = None  # (heads, skills) for routed methods
    routing_normalise_dim: int = -1  # weights sum to 1 over skills unless a method says otherwise

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, side: str, name: str) -> None:
        super().__init__()
        if side not in ("encoder", "decoder"):
            raise ValueError(f"{name}: side must be 'encoder' or 'decoder', got {side!r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.side, self.adapter_name = side, name
        self.cfg = cfg
        # Set by injection; not a submodule, because tables may be shared and live in model.tpds_routing.
        self._routing: list[RoutingTable | RandomRouting] = []
        self.merged = False
        self.health_sums: torch.Tensor | None = None  # health.record's running sums (not state)

    # Hugging Face code reads `.weight` of projections (T5 checks wo.weight.dtype).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    # --- routing -----------------------------------------------------------------------------------
    @property
    def routing(self) -> RoutingTable | RandomRouting | None:
        return self._routing[0] if self._routing else None

    def attach_routing(self, table: RoutingTable | RandomRouting) -> None:
        self._routing[:] = [table]

    def task_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mixing weights [u, heads, skills], row -> index into them [batch], or None when every row uses
        the first): one entry per distinct task (learned routing) or per row (random routing in training)."""
        groups = current_task_groups(self.side, x.shape[0], self.adapter_name)
        return self.routing.route(groups, x.shape[0], x.device)

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        if self.routing is None:
            delta = self.delta_from_weights(x, None, None)
        else:
            weights, inverse = self.task_weights(x)
            delta = self.delta_from_weights(x, weights, inverse)
        if health.is_recording():
            health.record(self, out, delta)
        return out + delta

    def delta_from_weights(
        self, x: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, weights: torch.Tensor | None) -> torch.Tensor:
        """Dense delta [in, out] for one task's weights [heads, skills] (None for unrouted methods);
        used by merge and by tests, never in the forward pass."""
        raise NotImplementedError

    # --- merge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, weights: torch.Tensor | None) -> None:
        delta = self.delta_weight(weights)
        self.base.weight += delta.t().to(self.base.weight.dtype)
        self.merged = True

    def module_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]


class MixedLowRank:
    """For routed methods whose task adapter is a pair (A [u, in, r], B [u, r, out]) built by `mixed`."""

    def mixed(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta_from_weights(self, x, weights, inverse):
        a, b = self.mixed(weights)
        return apply_low_rank(x, a, b, inverse, self.scale)

    def delta_weight(self, weights):
        a, b = self.mixed(weights[None])
        return a[0] @ b[0] * self.scale


def apply_low_rank(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inverse: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """x @ A @ B * scale with A [u, in, r], B [u, r, out] per distinct task (or [in, r], [r, out])."""
    if a.dim() == 2:
        return _scaled((x @ a.to(x.dtype)) @ b.to(x.dtype), scale)
    if a.shape[0] == 1:
        return _scaled((x @ a[0].to(x.dtype)) @ b[0].to(x.dtype), scale)
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    out = _scaled(torch.bmm(torch.bmm(rows, a[inverse].to(x.dtype)), b[inverse].to(x.dtype)), scale)
    return out.reshape(*x.shape[:-1], b.shape[-1])


def _scaled(out: torch.Tensor, scale: float) -> torch.Tensor:
    # alpha = r (Poly's and MHR's rank-1 skills) gives scale 1: skip a pass over the layer's output.
    return out if scale == 1 else out * scale
