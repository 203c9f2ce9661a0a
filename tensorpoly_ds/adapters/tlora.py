"""TLoRA and its routed forms TensorPoly-I and TensorPoly-II.

Each of the r columns of A (length d_in) is sum_k kron(v_1k, ..., v_Nk) truncated to d_in, with
v in R^q and q the integer N-th root of d_in; B likewise with d_out. Leaves: [N, R, r, q].
The adapter is materialised once per distinct task (d x r), never per token.

Memory: the factor build (Kronecker products, their LayerNorms, the mix over R) makes tensors of
R x r x q^N per layer and side, far larger than the leaves or than A and B themselves (at T0-3B about
2.7 GB saved for backward over the 432 layers with the official LayerNorm). It is therefore recomputed in
backward (`recompute_factors`, on by default): only the leaves, the routing weights and A, B are kept.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLinear, MixedLowRank, apply_low_rank, reference_bound, uniform_
from .config import AdapterConfig, int_root


class KronLayerNorm(nn.Module):
    """The official code's LayerNorm over [r, q^order] on Kronecker products of orders 2 and 4.

    Frozen affine weights (the official best config) stay at their init, ones and zeros: the identity, so
    the module holds no tensors for them (at T0-3B they would be 72.6M constants, 290 MB of every export,
    partitioned and gathered under ZeRO-3 for nothing). Trainable affine weights are parameters."""

    def __init__(self, rank: int, q: int, order: int, trainable: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.shape = (rank, q**order)
        self.weight = self.bias = None
        if trainable:
            self.weight = nn.Parameter(torch.ones(self.shape, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(self.shape, device=device, dtype=dtype))

    def forward(self, products: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.layer_norm(products, self.shape)
        return F.layer_norm(products, self.shape, self.weight.to(products.dtype), self.bias.to(products.dtype))


# state_dict keys of the affine weights of a KronLayerNorm, which exports and checkpoints written before the
# frozen ones stopped being tensors still hold
_NORM_AFFINE_KEY = re.compile(r"\.side_[ab]\.norms\.[24]\.(weight|bias)$")


def frozen_norm_constant(key: str, cfg: AdapterConfig) -> float | None:
    """The value a tensor stored under `key` holds if it is a frozen KronLayerNorm affine under `cfg` (weight
    1, bias 0; older exports and checkpoints stored them), else None."""
    match = _NORM_AFFINE_KEY.search(key)
    if match is None or not cfg.layernorm or cfg.layernorm_affine != "frozen":
        return None
    return 1.0 if match.group(1) == "weight" else 0.0


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


class _RecomputedFactors(torch.autograd.Function):
    """(A, B) = fn(*args) without saving fn's intermediates: backward runs fn again on the same inputs under
    the same autocast state and differentiates that. fn also reads parameters (leaves, trainable LayerNorm
    affines) from their modules: `slots` names them as (module, attribute) and they follow the args as
    inputs, so autograd routes their gradients. What is saved are aliases of the tensors the forward read,
    and the recomputation reads those through the slots: under ZeRO-3 a parameter's data is released after
    the forward (the alias keeps the gathered values, as the plain path's saved views do), and under
    torch.func.functional_call the swapped-in tensors are gone by the backward. A custom Function rather than
    torch.utils.checkpoint: per call it costs one nested autograd.grad, not saved-tensor hooks."""

    @staticmethod
    def forward(ctx, fn, num_args: int, slots, *tensors):
        device = tensors[-1].device.type
        ctx.fn, ctx.num_args, ctx.slots = fn, num_args, slots
        try:
            ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        except RuntimeError:  # a device without autocast (meta: the planner's shape-only forward)
            ctx.autocast = None
        ctx.needs_grad = [t.requires_grad for t in tensors]
        ctx.save_for_backward(*(t.detach() for t in tensors))
        return fn(*tensors[:num_args])

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, ctx.needs_grad)]
        args, params = inputs[: ctx.num_args], inputs[ctx.num_args :]
        # the forward's autocast state, whatever the caller of backward has on
        recast = (
            contextlib.nullcontext()
            if ctx.autocast is None
            else torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1])
        )
        current = [module._parameters[name] for module, name in ctx.slots]
        try:
            for (module, name), tensor in zip(ctx.slots, params):
                module._parameters[name] = tensor
            with torch.enable_grad(), recast:
                outputs = ctx.fn(*args)
        finally:
            for (module, name), tensor in zip(ctx.slots, current):
                module._parameters[name] = tensor
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        found = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grads, allow_unused=True)
        out = [None] * len(inputs)
        for i, grad in zip(wanted, found):
            out[i] = grad
        return (None, None, None, *out)


class _KronSide(nn.Module):
    """The leaves (and optional LayerNorms) that build A (d = d_in) or B (d = d_out)."""

    def __init__(self, cfg: AdapterConfig, dim: int, bound: float, device, dtype) -> None:
        super().__init__()
        self.dim, self.q = dim, int_root(dim, cfg.order)
        self.leaves = nn.Parameter(
            torch.empty(cfg.order, cfg.tensor_rank, cfg.rank, self.q, device=device, dtype=dtype)
        )
        uniform_(self.leaves, bound)
        self.norms = None
        if cfg.layernorm:
            trainable = cfg.layernorm_affine == "trainable"
            orders = ("2",) if cfg.order == 2 else ("2", "4")
            self.norms = nn.ModuleDict(
                {o: KronLayerNorm(cfg.rank, self.q, int(o), trainable, device, dtype) for o in orders}
            )

    def terms(self) -> torch.Tensor:
        """[R, r, dim]: one Kronecker term per tensor-rank index, truncated to dim."""
        return kron_columns(self.leaves.transpose(0, 1), self.norms)[..., : self.dim]

    def from_mixed_leaves(self, mixed: torch.Tensor) -> torch.Tensor:
        """[u, N, r, q] mixed leaves -> [u, r, dim]."""
        return kron_columns(mixed, self.norms)[..., : self.dim]


class TLoRALinear(AdapterLinear):
    """Unrouted TLoRA: A = sum_k kron_j v_jk (the R terms are summed, not mixed)."""

    # Recompute the factor build in backward instead of saving its R x r x q^N intermediates (module
    # docstring). Exact: the recomputation runs the same operations on the same inputs.
    recompute_factors: bool = True

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, side: str, name: str) -> None:
        super().__init__(base, cfg, side, name)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # Official code: both sides U(+-1/sqrt(3 in)), so the adapter is active at init (a zero
        # Kronecker factor would also zero every other factor's gradient).
        bound = reference_bound(cfg, self.in_features)
        self.side_a = _KronSide(cfg, self.in_features, bound, **kw)
        self.side_b = _KronSide(cfg, self.out_features, bound, **kw)
        self.scale = cfg.alpha / cfg.rank
        # cfg.output_gain: zero at init, so delta W = 0 while the factors keep their fixed-norm init; shape [1]
        # rather than a 0-dim tensor, which ZeRO-3 partitioning and flattening handle as any other parameter
        self.output_gain = nn.Parameter(torch.zeros(1, **kw)) if cfg.output_gain else None

    def gained(self, delta: torch.Tensor) -> torch.Tensor:
        """delta times the output gain (none configured: delta itself, the same tensor)."""
        return delta if self.output_gain is None else delta * self.output_gain.to(delta.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.side_a.terms().sum(0).t(), self.side_b.terms().sum(0)

    def build(self, factor_fn, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """factor_fn(*args) -> (A, B), with its intermediates recomputed in backward if recompute_factors.
        factor_fn draws no random numbers (routing noise is drawn before), so recomputing it is exact."""
        if not (self.recompute_factors and torch.is_grad_enabled()):
            return factor_fn(*args)
        slots, params = [], []
        for side in (self.side_a, self.side_b):
            for module in side.modules():
                for name in [n for n, p in module._parameters.items() if p is not None and p.requires_grad]:
                    slots.append((module, name))
                    # attribute access, not the dict's items(): under ZeRO-3 it gathers the parameter
                    params.append(getattr(module, name))
        if not any(t.requires_grad for t in (*args, *params)):
            return factor_fn(*args)
        return _RecomputedFactors.apply(factor_fn, len(args), slots, *args, *params)

    def delta_from_weights(self, x, weights, inverse):
        a, b = self.build(self.factors)
        return self.gained(apply_low_rank(x, a, b, None, self.scale))

    def delta_weight(self, weights=None):
        a, b = self.factors()
        return self.gained(a @ b * self.scale)


class TensorPolyILinear(MixedLowRank, TLoRALinear):
    """TensorPoly-I: the R Kronecker terms are the skills; A_task = sum_k w_k kron_j v_jk."""

    def __init__(self, base, cfg, side, name) -> None:
        super().__init__(base, cfg, side, name)
        self.routing_shape = (1, cfg.tensor_rank)

    def delta_from_weights(self, x, weights, inverse):
        a, b = self.build(self.mixed, weights)
        return self.gained(apply_low_rank(x, a, b, inverse, self.scale))

    def delta_weight(self, weights):
        return self.gained(MixedLowRank.delta_weight(self, weights))

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


def set_factor_recomputation(model: nn.Module, enabled: bool) -> int:
    """Set recompute_factors on every TLoRA-family layer of `model`; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, TLoRALinear)]
    for layer in layers:
        layer.recompute_factors = enabled
    return len(layers)
