"""Task routing: per-task logits, their mixing weights, and how task ids reach the layers.

Task ids travel in a ContextVar set by `task_routing(...)` for the duration of one forward pass.
Nothing is stored on the modules, so concurrent forward passes (threads, generation, activation
recomputation) cannot see each other's ids, and a layer called outside a routing scope fails loudly.

Two kinds of routing sit behind a layer: `RoutingTable` (learned logits per task: Poly, MHR, TensorPoly)
and `RandomRouting` (Random-mu of the MHR paper: no parameters; a random binary allocation per example
in training, the uniform average otherwise). Both answer `route(groups, rows, device)`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

NORMALISE_EPS = 1e-12


class RoutingError(RuntimeError):
    """Task ids are missing or do not match the batch a layer sees."""


@dataclass(frozen=True)
class TaskGroups:
    """One side's ids, grouped once per routing scope so that every adapted layer reuses the grouping
    (hundreds of layers per forward pass) instead of recomputing it (a device sync each on GPUs)."""

    ids: torch.Tensor  # [batch] or a 0-dim tensor (one task for every row)
    distinct: torch.Tensor  # [u] distinct task ids
    inverse: torch.Tensor | None  # [batch] row -> index into `distinct`; None for a 0-dim id

    @classmethod
    def of(cls, ids: torch.Tensor) -> TaskGroups:
        if ids.dim() == 0:
            return cls(ids, ids[None], None)
        distinct, inverse = torch.unique(ids, return_inverse=True)
        return cls(ids, distinct, inverse)


@dataclass(frozen=True)
class RoutingBatch:
    encoder: TaskGroups
    decoder: TaskGroups
    # Random allocations drawn in this scope, so every layer sharing a table, and the recomputation of
    # activation checkpointing (which re-enters this same object), sees the same allocation.
    draws: dict = field(default_factory=dict, compare=False, repr=False)

    def generator(self, device: torch.device) -> torch.Generator:
        """This scope's generator for random routing on `device`, seeded once per scope from Python's
        global RNG. Not torch's: activation checkpointing rewinds torch's RNG for the recomputation, where
        the cached allocation is not redrawn, so drawing from torch's stream would shift every later
        dropout mask. Python's state is per rank and saved in the engine's checkpoints (resume-exact)."""
        key = ("generator", str(device))
        gen = self.draws.get(key)
        if gen is None:
            gen = self.draws[key] = torch.Generator(device=device).manual_seed(random.getrandbits(63))
        return gen


_CURRENT: ContextVar[RoutingBatch | None] = ContextVar("tensorpoly_ds_routing", default=None)


def _as_ids(ids: int | Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    tensor = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dim() > 1:
        raise RoutingError(
            f"{what} must be an integer id or a 1-D integer tensor, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    return tensor.long()


@contextlib.contextmanager
def task_routing(task_ids, decoder_task_ids=None) -> Iterator[RoutingBatch]:
    """Route one forward pass. `task_ids` has one id per encoder row (or one id for all rows);
    `decoder_task_ids` one per decoder row, defaulting to `task_ids`. Rank classification passes the
    ids repeated per answer choice; beam search passes them repeated per beam."""
    encoder = TaskGroups.of(_as_ids(task_ids, "task_ids"))
    decoder = encoder if decoder_task_ids is None else TaskGroups.of(_as_ids(decoder_task_ids, "decoder_task_ids"))
    token = _CURRENT.set(RoutingBatch(encoder, decoder))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def _restored(batch: RoutingBatch | None) -> Iterator[None]:
    token = _CURRENT.set(batch)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def routing_checkpoint_context_fn():
    """`context_fn` for torch.utils.checkpoint (non-reentrant): the recomputation in backward runs
    outside the forward's routing scope, so it re-enters the scope captured at forward time."""
    captured = _CURRENT.get()
    return contextlib.nullcontext(), _restored(captured)


def current_task_groups(side: str, batch_size: int, where: str) -> TaskGroups:
    """The grouped ids for a layer on `side` ('encoder' or 'decoder') that sees `batch_size` rows."""
    routing = _CURRENT.get()
    if routing is None:
        raise RoutingError(
            f"{where}: a routed adapter ran outside task_routing(...); "
            "wrap the forward pass in `with task_routing(task_ids): ...`"
        )
    groups = routing.encoder if side == "encoder" else routing.decoder
    if groups.ids.dim() == 1 and groups.ids.shape[0] != batch_size:
        raise RoutingError(
            f"{where}: {side} batch has {batch_size} rows but {groups.ids.shape[0]} task ids were "
            "given; pass decoder_task_ids explicitly when the decoder batch differs (choices, beams)"
        )
    return groups


class RoutingTable(nn.Module):
    """Logits Z[task, heads, skills]; weights are sigmoid(Z) (or a relaxed Bernoulli sample in
    training with `gumbel`), normalised to sum 1 over `normalise_dim`."""

    def __init__(
        self,
        num_tasks: int,
        heads: int,
        skills: int,
        *,
        gumbel: bool = False,
        temperature: float = 1.0,
        straight_through: bool = False,
        normalise_dim: int = -1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_tasks, self.heads, self.skills = num_tasks, heads, skills
        self.gumbel, self.temperature, self.straight_through = gumbel, temperature, straight_through
        self.normalise_dim = normalise_dim
        self.logits = nn.Parameter(torch.empty(num_tasks, heads, skills, device=device, dtype=dtype))
        # "uniform" fixes the weights at 1/S (adaptation mode mu); kept as a buffer so it is saved.
        self.register_buffer("uniform", torch.zeros((), dtype=torch.bool, device=device), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.logits.device.type != "meta":
            with torch.no_grad():
                self.logits.uniform_(-1e-3, 1e-3)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, heads={self.heads}, skills={self.skills}, gumbel={self.gumbel}"

    def route(self, groups: TaskGroups, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights of the distinct tasks [u, heads, skills], row -> distinct index [rows] or None)."""
        inverse = None if groups.inverse is None else groups.inverse.to(device)
        return self.weights(groups.distinct), inverse

    def weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Mixing weights [len(task_ids), heads, skills] for the given (distinct) task ids."""
        logits = self.logits[task_ids.to(self.logits.device)]
        if bool(self.uniform):
            return uniform_weights(tuple(logits.shape), self.normalise_dim, device=logits.device, dtype=logits.dtype)
        if self.training and self.gumbel:
            probs = torch.distributions.RelaxedBernoulli(
                torch.tensor(self.temperature, dtype=logits.dtype, device=logits.device), logits=logits
            ).rsample()
            if self.straight_through:
                probs = (probs > 0.5).to(probs.dtype) - probs.detach() + probs
        else:
            probs = torch.sigmoid(logits)
        return probs / (probs.sum(dim=self.normalise_dim, keepdim=True) + NORMALISE_EPS)


def uniform_weights(shape: tuple[int, ...], normalise_dim: int, device=None, dtype=None) -> torch.Tensor:
    return torch.full(shape, 1.0 / shape[normalise_dim], device=device, dtype=dtype)


def random_allocation(
    rows: int, heads: int, skills: int, normalise_dim: int, generator: torch.Generator
) -> torch.Tensor:
    """[rows, heads, skills]: along `normalise_dim`, a uniformly random non-empty subset of the modules
    (i.i.d. fair coins conditioned on at least one module), weighted 1/|subset| as Poly normalises a binary
    routing. A non-empty subset is the bit pattern of an integer drawn uniformly from [1, 2^n)."""
    shape = [rows, heads, skills]
    dim = normalise_dim % 3
    n = shape[dim]
    other = shape[:dim] + shape[dim + 1 :]
    codes = torch.randint(1, 2**n, other, generator=generator, device=generator.device)
    bits = (codes[..., None] >> torch.arange(n, device=codes.device)) & 1
    bits = bits.movedim(-1, dim).float()
    return bits / bits.sum(dim=dim, keepdim=True)


class RandomRouting(nn.Module):
    """Random-mu (MHR paper, "Learning the routing function is essential"): no parameters, no task
    information. In training every example gets its own random binary allocation per routing table
    (one subset per head, or per order for TensorPoly-II/X: the same rows the learned weights have);
    outside training, or once adaptation mode mu fixed it (`uniform`), the modules are averaged."""

    def __init__(self, num_tasks: int, heads: int, skills: int, *, normalise_dim: int = -1, device=None) -> None:
        super().__init__()
        self.num_tasks, self.heads, self.skills, self.normalise_dim = num_tasks, heads, skills, normalise_dim
        self.register_buffer("uniform", torch.zeros((), dtype=torch.bool, device=device), persistent=True)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, heads={self.heads}, skills={self.skills}, random"

    def weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The deterministic (evaluation) weights: uniform, whatever the task."""
        return uniform_weights((len(task_ids), self.heads, self.skills), self.normalise_dim, device=task_ids.device)

    def route(self, groups: TaskGroups, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training or bool(self.uniform):
            return uniform_weights((1, self.heads, self.skills), self.normalise_dim, device=device), None
        batch = _CURRENT.get()
        key = (id(self), id(groups), rows)
        drawn = batch.draws.get(key)
        if drawn is None:
            weights = random_allocation(rows, self.heads, self.skills, self.normalise_dim, batch.generator(device))
            drawn = batch.draws[key] = (weights, torch.arange(rows, device=device))
        return drawn


def generate(model, input_ids: torch.Tensor, task_ids, **generate_kwargs) -> torch.Tensor:
    """`model.generate` with routing: the encoder sees one row per example, the decoder one row per
    beam (beam search) or per returned sequence (sampling), so the decoder ids are repeated to match."""
    ids = _as_ids(task_ids, "task_ids")
    beams = int(generate_kwargs.get("num_beams", 1) or 1)
    expand = beams if beams > 1 else int(generate_kwargs.get("num_return_sequences", 1) or 1)
    decoder_ids = ids if ids.dim() == 0 else ids.repeat_interleave(expand)
    with task_routing(ids, decoder_task_ids=decoder_ids):
        return model.generate(input_ids=input_ids, **generate_kwargs)
