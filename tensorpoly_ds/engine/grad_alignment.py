"""Gradient alignment between tasks during multi-task pretraining (MHR paper, Fig. 3 left).

Every `train.grad_alignment_every` steps, rank 0 takes one fixed probe batch per monitored task (the first
`train.grad_alignment_rows` rows of the task in the training split), computes each task's gradient of its
token-mean loss with respect to the adapter module parameters (routing logits excluded: they are per task),
and logs the cosine similarity matrix of those gradients.

The probe leaves training untouched: gradients come from torch.autograd.grad (nothing is accumulated into
`.grad`, so DeepSpeed's gradient hooks never fire), the batches are read outside the training stream, the RNG
states are restored afterwards, and the forward passes run in eval mode (no dropout; deterministic routing:
sigmoid weights without Gumbel noise, the uniform average for Random-mu), so the matrix measures the
parameters rather than the noise. ZeRO-3 is refused (its partitioned parameters would need every rank in
each forward pass) and so is a full fine-tune (it has no adapter).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tensorpoly_ds.adapters import adapter_param_groups, task_routing
from tpds_common.errors import ConfigError

from . import checkpoint as ckpt

DEFAULT_MAX_TASKS = 8


class GradAlignmentError(ConfigError):
    """train.grad_alignment_tasks cannot be probed (unknown task, too few tasks, no rows)."""


def unsupported(zero_stage: int, has_adapter: bool) -> str | None:
    """Why the probe cannot run with this setup (None when it can)."""
    if zero_stage == 3:
        return (
            "the gradient-alignment probe runs on rank 0 alone, which ZeRO-3's partitioned parameters do not "
            "allow; use zero_stage <= 2"
        )
    if not has_adapter:
        return "gradient alignment compares adapter gradients; a full fine-tune has no adapter"
    return None


def select_tasks(task_names: Sequence[str], requested: Sequence[str], limit: int = DEFAULT_MAX_TASKS) -> list[int]:
    """Task ids to probe: the requested names, or up to `limit` tasks evenly spaced over the task list."""
    if requested:
        index = {name: i for i, name in enumerate(task_names)}
        unknown = [name for name in requested if name not in index]
        if unknown:
            raise GradAlignmentError(
                f"train.grad_alignment_tasks: unknown task(s) {unknown}; the run's tasks are "
                f"{list(task_names)[:20]}{' ...' if len(task_names) > 20 else ''}"
            )
        ids = [index[name] for name in dict.fromkeys(requested)]
    else:
        n = min(limit, len(task_names))
        ids = sorted({round(i * (len(task_names) - 1) / max(1, n - 1)) for i in range(n)})
    if len(ids) < 2:
        raise GradAlignmentError(f"train.grad_alignment_tasks: gradient alignment needs at least 2 tasks, got {ids}")
    return ids


def task_column(rows) -> list[int]:
    """The task_id of every training row (an Arrow column read at once when the split is a datasets.Dataset)."""
    data = getattr(rows, "data", None)
    if data is not None and hasattr(data, "column"):
        return data.column("task_id").to_pylist()
    return [int(t) for t in rows[list(range(len(rows)))]["task_id"]]


def probe_batches(
    rows, task_ids: Sequence[int], per_task: int, collate: Callable[[list[dict]], dict], task_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One batch per task: its first `per_task` rows in split order (fixed for the whole run)."""
    wanted = {t: [] for t in task_ids}
    for i, t in enumerate(task_column(rows)):
        if t in wanted and len(wanted[t]) < per_task:
            wanted[t].append(i)
    empty = [task_names[t] for t, idx in wanted.items() if not idx]
    if empty:
        raise GradAlignmentError(f"train.grad_alignment_tasks: no training rows for task(s) {empty}")
    out = []
    for t in task_ids:
        cols = rows[wanted[t]]
        out.append(collate([{k: cols[k][i] for k in cols} for i in range(len(wanted[t]))]))
    return out


def task_gradients(
    model: nn.Module, batches: Sequence[dict], params: Sequence[torch.Tensor], loss_fn: Callable, weight_fn: Callable
) -> torch.Tensor:
    """[tasks, P]: each batch's gradient of loss_sum / weight (its token mean) w.r.t. `params`, flattened,
    in float32. Runs in eval mode and restores the mode and every RNG state afterwards."""
    was_training = model.training
    rng = ckpt.rng_state()
    model.eval()
    try:
        rows = []
        for batch in batches:
            with task_routing(batch["task_ids"]):
                loss_sum, _ = loss_fn(model, batch)
            grads = torch.autograd.grad(loss_sum / weight_fn(batch), list(params), allow_unused=True)
            rows.append(
                torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)]
                )
            )
        return torch.stack(rows)
    finally:
        model.train(was_training)
        ckpt.set_rng_state(rng)


def cosine_matrix(grads: torch.Tensor) -> torch.Tensor:
    """[tasks, tasks] cosine similarities of the rows (0 where a row is all zero)."""
    norms = grads.norm(dim=1)
    unit = grads / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    return (unit @ unit.T).clamp(-1.0, 1.0)


def mean_offdiag(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1)))


class GradAlignmentProbe:
    """The fixed probe of one run: `measure(module)` -> (cosine matrix [T, T] on the CPU, seconds)."""

    def __init__(self, batches: list[dict], task_names: list[str], loss_fn: Callable, weight_fn: Callable) -> None:
        self.batches, self.task_names = batches, task_names
        self.loss_fn, self.weight_fn = loss_fn, weight_fn

    @classmethod
    def build(
        cls,
        rows,
        all_tasks: Sequence[str],
        requested: Sequence[str],
        per_task: int,
        collate: Callable[[list[dict]], dict],
        loss_fn: Callable,
        weight_fn: Callable,
    ) -> GradAlignmentProbe:
        ids = select_tasks(all_tasks, requested)
        batches = probe_batches(rows, ids, per_task, collate, all_tasks)
        return cls(batches, [all_tasks[t] for t in ids], loss_fn, weight_fn)

    def measure(self, module: nn.Module, device: torch.device) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        params = adapter_param_groups(module)["modules"]
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in self.batches]
        matrix = cosine_matrix(task_gradients(module, batches, params, self.loss_fn, self.weight_fn)).cpu()
        return matrix, time.perf_counter() - t0
