"""TensorPoly-X: a full-rank delta W in tensor-train (ring) form with routed bonds.

N distinct cores G_n of shape [q_in, R, q_out, R]; the routing weights w[task, n, :] scale core n's
outgoing bond, so R is the number of latent experts at each of the N levels. The ring closes by a
trace (the first core's incoming bond is the last core's outgoing one), so every core has the same
shape and every bond is routed. delta W[(i_1..i_N), (o_1..o_N)] = tr(prod_n G_n[i_n, :, o_n, :] diag(w_n)),
truncated to [d_in, d_out]. The last core starts at zero, so delta W = 0 at init.

The forward pass picks the cheaper of two exact paths: contracting the input with the cores token
by token (never forming d_in x d_out), or building delta W once per distinct task in the batch when
there are so many tokens that the dense product is cheaper. Both close the ring in their last product
(R^2 per entry, not R^3 then a trace). The dense path applies each task's delta W to that task's rows
(grouped, never one copy per row), so its per-token cost does not depend on the number of distinct tasks;
only building delta W (R^2 (q_in q_out)^N per task for N = 2) does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLinear
from .config import AdapterConfig, int_root


class TensorPolyXLinear(AdapterLinear):
    def __init__(self, base: nn.Linear, cfg: AdapterConfig, side: str, name: str, path: str = "auto") -> None:
        super().__init__(base, cfg, side, name)
        n, bond = cfg.order, cfg.tensor_rank
        self.q_in, self.q_out = int_root(self.in_features, n), int_root(self.out_features, n)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # Distinct Parameter objects per core (the official code shares the first N-1 by accident).
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.q_in, bond, self.q_out, bond, **kw)) for _ in range(n)
        )
        bound = cfg.init_scale if cfg.init_scale is not None else 1.0 / math.sqrt(3 * self.q_in * bond)
        for i, core in enumerate(self.cores):
            if core.device.type != "meta":
                with torch.no_grad():
                    core.zero_() if i == n - 1 else core.uniform_(-bound, bound)
        self.routing_shape = (n, bond)
        self.path = path

    def routed_cores(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """Cores with each outgoing bond scaled: [u, q_in, R, q_out, R] per level."""
        w = weights.to(self.cores[0].dtype)
        return [core[None] * w[:, n, None, None, None, :] for n, core in enumerate(self.cores)]

    def dense(self, weights: torch.Tensor) -> torch.Tensor:
        """delta W [u, d_in, d_out] for weights [u, N, R]."""
        cores = self.routed_cores(weights)
        u = weights.shape[0]
        if len(cores) == 1:
            full = torch.einsum("uiaoa->uio", cores[0])
        else:
            acc = cores[0].permute(0, 2, 1, 3, 4)  # [u, a0, i1, o1, b1]
            for core in cores[1:-1]:
                # acc [u, a0, I, O, b] x core [u, i, b, o, c] -> [u, a0, I, i, O, o, c]
                acc = torch.einsum("uaIOb,uiboc->uaIiOoc", acc, core)
                s = acc.shape
                acc = acc.reshape(u, s[1], s[2] * s[3], s[4] * s[5], s[6])
            # The last core's outgoing bond is the first core's incoming one: contracting both bonds in one
            # product closes the ring at R^2 per entry, where keeping a0 open and tracing after costs R^3
            # and an [u, R, d_in, d_out, R] intermediate.
            full = torch.einsum("uaIOb,uiboa->uIiOo", acc, cores[-1])
            full = full.reshape(u, self.q_in ** len(cores), self.q_out ** len(cores))
        return full[:, : self.in_features, : self.out_features]

    def contract(self, x: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """x [b, ..., d_in] -> [b, ..., d_out] through the cores, token by token."""
        n = len(self.cores)
        b = x.shape[0]
        tokens = x.reshape(b, -1, self.in_features)
        pad = self.q_in**n - self.in_features
        if pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad))
        cores = [c.to(x.dtype) for c in self.routed_cores(weights)]
        one_task = weights.shape[0] == 1

        def step(eq: str, state: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
            # `eq` is written for per-row cores [b, ...]; with one task every row shares core[0].
            if one_task:
                return torch.einsum(eq.replace(",b", ","), state, core[0])
            return torch.einsum(eq, state, core[inverse])

        if n == 1:
            out = step("bli,biaoa->blo", tokens, cores[0])
        else:
            state = tokens.reshape(b, tokens.shape[1], self.q_in, -1)  # [b, L, i1, rest]
            state = step("blir,biaoc->blacor", state, cores[0])  # [b, L, a0, c, O, rest]
            for core in cores[1:-1]:
                s = state.shape
                state = state.reshape(s[0], s[1], s[2], s[3], s[4], self.q_in, s[5] // self.q_in)
                state = step("blacOiR,bicod->bladOoR", state, core)
                s = state.shape
                state = state.reshape(s[0], s[1], s[2], s[3], s[4] * s[5], s[6])
            # rest is the last input digit; the last core's outgoing bond closes the ring on a0 (R^2, not R^3).
            out = step("blacOi,bicoa->blOo", state, cores[-1]).flatten(2)
        return out[..., : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def path_macs(self, tokens: int, distinct: int) -> dict[str, int]:
        """Multiply-adds of each path (what torch's FLOP counter counts, halved). The levels between the first
        and the last carry three bonds (the ring's first one, the incoming and the outgoing), hence R^3; the
        last level closes the ring and contracts two (R^2). Traces and sums are not multiply-adds."""
        n, r = len(self.cores), self.cores[0].shape[1]
        q_in, q_out = self.q_in, self.q_out
        apply = tokens * self.in_features * self.out_features
        if n == 1:
            return {"contract": tokens * q_in * q_out, "dense": apply}
        middle = range(2, n)
        contract = tokens * (
            r**2 * q_out * q_in**n + r**3 * sum(q_out**k * q_in ** (n - k + 1) for k in middle) + r**2 * q_in * q_out**n
        )
        dense = distinct * (r**3 * sum((q_in * q_out) ** k for k in middle) + r**2 * (q_in * q_out) ** n) + apply
        return {"contract": contract, "dense": dense}

    def choose_path(self, tokens: int, distinct: int) -> str:
        if self.path != "auto":
            return self.path
        macs = self.path_macs(tokens, distinct)
        return "contract" if macs["contract"] <= macs["dense"] else "dense"

    def delta_from_weights(self, x, weights, inverse):
        tokens = x.numel() // self.in_features
        if self.choose_path(tokens, weights.shape[0]) == "contract":
            return self.contract(x, weights, inverse)
        delta = self.dense(weights).to(x.dtype)
        if delta.shape[0] == 1:
            return x @ delta[0]
        return apply_per_task(x, delta, inverse)

    def delta_weight(self, weights):
        return self.dense(weights[None])[0]


def apply_per_task(x: torch.Tensor, delta: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x [b, ..., d_in] @ delta[inverse[row]] [d_in, d_out] for every row, with each task's rows in one product.

    Rows are grouped by task, so no per-row copy of delta is made: gathering delta[inverse] for a bmm would
    write and keep for backward b x d_in x d_out, which grows with the batch (a T0-3B layer: 8 MiB per row
    in bf16). The row -> task map is read on the host (one sync per call on a GPU); rows already in task
    order (one task per row, as random routing draws them) are not permuted."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    task_of_row = inverse.tolist()
    counts = [0] * delta.shape[0]
    for task in task_of_row:
        counts[task] += 1
    order = None if task_of_row == sorted(task_of_row) else torch.argsort(inverse, stable=True)
    grouped = rows if order is None else rows[order]
    if len(set(counts)) == 1:  # equal groups (e.g. one row per task): one batched product
        out = torch.bmm(grouped.reshape(len(counts), -1, rows.shape[-1]), delta)
    else:
        out = torch.cat([part.flatten(0, 1) @ d for part, d in zip(grouped.split(counts), delta)])
    out = out.reshape(rows.shape[0], rows.shape[1], -1)
    if order is not None:
        out = out[torch.argsort(order)]
    return out.reshape(*x.shape[:-1], delta.shape[-1])
