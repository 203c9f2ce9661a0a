"""TLoRA and its routed forms TensorPoly-I and TensorPoly-II.

Each of the r columns of A (length d_in) is sum_k kron(v_1k, ..., v_Nk) truncated to d_in, with
v in R^q and q the integer N-th root of d_in; B likewise with d_out. Leaves: [N, R, r, q].
The adapter is materialised once per distinct task (d x r), never per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLinear, MixedLowRank, apply_low_rank, reference_bound, uniform_
from .config import AdapterConfig, int_root


class KronLayerNorm(nn.Module):
    """The official code's LayerNorm over [r, q^order] on Kronecker products of orders 2 and 4."""

    def __init__(self, rank: int, q: int, order: int, trainable: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.shape = (rank, q ** order)
        self.weight = nn.Parameter(torch.ones(self.shape, device=device, dtype=dtype), requires_grad=trainable)
        self.bias = nn.Parameter(torch.zeros(self.shape, device=device, dtype=dtype), requires_grad=trainable)

    def forward(self, products: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(products, self.shape, self.weight.to(products.dtype), self.bias.to(products.dtype))


def kron_columns(leaves: torch.Tensor, norms: nn.ModuleDict | None = None) -> torch.Tensor:
    """[..., N, r, q] -> [..., r, q^N]: the Kronecker product over the N factors, column by column
    (entry i*q + j of kron(a, b) is a[i] * b[j], as torch.kron)."""
    order = leaves.shape[-3]

    def product(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return (first[..., :, None] * second[..., None, :]).flatten(-2)

    if norms is None:
        out = leaves[..., 0, :, :]
        for n in range(1, order):
            out = product(out, leaves[..., n, :, :])
        return out
    if order == 2:
        return norms["2"](product(leaves[..., 0, :, :], leaves[..., 1, :, :]))
    left = norms["2"](product(leaves[..., 0, :, :], leaves[..., 1, :, :]))
    right = norms["2"](product(leaves[..., 2, :, :], leaves[..., 3, :, :]))
    return norms["4"](product(left, right))


class _KronSide(nn.Module):
    """The leaves (and optional LayerNorms) that build A (d = d_in) or B (d = d_out)."""

    def __init__(self, cfg: AdapterConfig, dim: int, bound: float, device, dtype) -> None:
        super().__init__()
        self.dim, self.q = dim, int_root(dim, cfg.order)
        self.leaves = nn.Parameter(torch.empty(cfg.order, cfg.tensor_rank, cfg.rank, self.q, device=device, dtype=dtype))
        uniform_(self.leaves, bound)
        self.norms = None
        if cfg.layernorm:
            trainable = cfg.layernorm_affine == "trainable"
            orders = ("2",) if cfg.order == 2 else ("2", "4")
            self.norms = nn.ModuleDict({o: KronLayerNorm(cfg.rank, self.q, int(o), trainable, device, dtype)
                                        for o in orders})

    def terms(self) -> torch.Tensor:
        """[R, r, dim]: one Kronecker term per tensor-rank index, truncated to dim."""
        return kron_columns(self.leaves.transpose(0, 1), self.norms)[..., : self.dim]

    def from_mixed_leaves(self, mixed: torch.Tensor) -> torch.Tensor:
        """[u, N, r, q] mixed leaves -> [u, r, dim]."""
        return kron_columns(mixed, self.norms)[..., : self.dim]


class TLoRALinear(AdapterLinear):
    """Unrouted TLoRA: A = sum_k kron_j v_jk (the R terms are summed, not mixed)."""

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, side: str, name: str) -> None:
        super().__init__(base, cfg, side, name)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # Official code: both sides U(+-1/sqrt(3 in)), so the adapter is active at init (a zero
        # Kronecker factor would also zero every other factor's gradient).
        bound = reference_bound(cfg, self.in_features)
        self.side_a = _KronSide(cfg, self.in_features, bound, **kw)
        self.side_b = _KronSide(cfg, self.out_features, bound, **kw)
        self.scale = cfg.alpha / cfg.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.side_a.terms().sum(0).t(), self.side_b.terms().sum(0)

    def delta_from_weights(self, x, weights, inverse):
        a, b = self.factors()
        return apply_low_rank(x, a, b, None, self.scale)

    def delta_weight(self, weights=None):
        a, b = self.factors()
        return a @ b * self.scale


class TensorPolyILinear(MixedLowRank, TLoRALinear):
    """TensorPoly-I: the R Kronecker terms are the skills; A_task = sum_k w_k kron_j v_jk."""

    def __init__(self, base, cfg, side, name) -> None:
        super().__init__(base, cfg, side, name)
        self.routing_shape = (1, cfg.tensor_rank)

    def mixed(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weights[:, 0, :].to(self.side_a.leaves.dtype)
        a = torch.einsum("uk,krd->udr", w, self.side_a.terms())
        b = torch.einsum("uk,krd->urd", w, self.side_b.terms())
        return a, b


class TensorPolyIILinear(TensorPolyILinear):
    """TensorPoly-II with routing [task, N, R].

    official (default): each order j mixes its R leaves, then one Kronecker product is taken:
        A_task = kron_j (sum_k w_jk v_jk), weights normalised over R.
    paper: A_task = sum_k kron_j (w_jk v_jk) = sum_k (prod_j w_jk) kron_j v_jk, weights normalised over
        the order index j, as the paper's formula writes it.
    """

    def __init__(self, base, cfg, side, name) -> None:
        super().__init__(base, cfg, side, name)
        self.routing_shape = (cfg.order, cfg.tensor_rank)
        self.paper = cfg.tensorpoly_ii_semantics == "paper"

    @property
    def routing_normalise_dim(self) -> int:
        return -2 if self.paper else -1

    def mixed(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weights.to(self.side_a.leaves.dtype)
        if self.paper:
            coeff = w.prod(dim=1)  # [u, R]
            a = torch.einsum("uk,krd->udr", coeff, self.side_a.terms())
            b = torch.einsum("uk,krd->urd", coeff, self.side_b.terms())
            return a, b
        mixed_a = torch.einsum("unk,nkrq->unrq", w, self.side_a.leaves)
        mixed_b = torch.einsum("unk,nkrq->unrq", w, self.side_b.leaves)
        return self.side_a.from_mixed_leaves(mixed_a).transpose(1, 2), self.side_b.from_mixed_leaves(mixed_b)
