"""The local trainer of adaptation jobs: a plain one-process PyTorch loop (loss hook, warmup + linear decay,
grad-norm clipping) that honours stop requests.

After every optimizer step the loop checks the stop flag (SIGTERM/SIGINT/SIGUSR1, tensorpoly_ds.engine.stop);
when set it writes OUT/local_checkpoint.pt (trainable parameters, optimizer, schedule, sampler and RNG
states; atomic) and returns. The next run of the job loads it and continues exactly where the stopped one
would have: the same batches, the same dropout masks, the same updates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tpds_common.files import atomic_output
from ..adapters import routing_tables
from ..engine.checkpoint import rng_state, set_rng_state

CHECKPOINT_FILE = "local_checkpoint.pt"


class LocalCheckpointError(RuntimeError):
    pass


def build_optimizer(model: nn.Module, name: str, lr: float, routing_lr: float | None) -> torch.optim.Optimizer:
    tables = routing_tables(model)
    routing = [t.logits for t in tables.values() if t.logits.requires_grad]
    rid = {id(p) for p in routing}
    modules = [p for p in model.parameters() if p.requires_grad and id(p) not in rid]
    groups = [g for g in ({"params": modules, "lr": lr, "name": "modules"},
                          {"params": routing, "lr": routing_lr or lr, "name": "routing"}) if g["params"]]
    if not groups:
        from .job import JobError

        raise JobError("no trainable parameters")
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup over warmup_ratio * total steps, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class EpochSampler:
    """Batches of row indices: a fresh seeded permutation per epoch (rows smaller than a batch repeat)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            from .job import JobError

            raise JobError("no training rows")
        self.n, self.batch, self.gen = n, batch_size, torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> list[int]:
        while len(self.queue) < self.batch:
            self.queue += torch.randperm(self.n, generator=self.gen).tolist()
        out, self.queue = self.queue[:self.batch], self.queue[self.batch:]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "queue": list(self.queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])
        self.queue = list(state["queue"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the reader raises, name the file
        raise LocalCheckpointError(f"{path} is unreadable ({type(err).__name__}: {str(err)[:300]}); "
                                   "rerun with --force to start the job over") from None


def train_steps(model: nn.Module, *, steps: int, sampler: EpochSampler, make_batch: Callable[[list[int]], Any],
                loss_fn: Callable[[Any], dict], optimizer: torch.optim.Optimizer, warmup_ratio: float, clip: float,
                grad_accum: int = 1, on_step: Callable[[int, dict], None] | None = None, stop=None,
                checkpoint: Path | None = None, phase: str = "fewshot",
                resume_state: dict[str, Any] | None = None) -> tuple[list[dict], int | None]:
    """Train for `steps` optimizer steps. Returns (history of this call, step at which a stop request
    ended the loop or None). With `stop` (a StopFlag) and `checkpoint`, a stop request is honoured after
    the current step: the checkpoint is written and the loop returns. `resume_state` (a loaded checkpoint
    of this phase) continues a stopped loop."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup_ratio))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    start = 0
    if resume_state is not None:
        with torch.no_grad():
            for name, value in resume_state["params"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        sampler.load_state_dict(resume_state["sampler"])
        set_rng_state(json.loads(resume_state["rng"]))
        start = int(resume_state["step"])
    history = []
    model.train()
    for step in range(start + 1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for _ in range(grad_accum):
            out = loss_fn(make_batch(sampler.next()))
            (out["loss"] / grad_accum).backward()
            for k, v in out.items():
                stats[k] = stats.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / grad_accum
        if clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        sched.step()
        stats["lr"] = optimizer.param_groups[0]["lr"]
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"step {step}: non-finite loss {stats['loss']}")
        history.append({"step": step, **stats})
        if on_step is not None:
            on_step(step, stats)
        if stop is not None and stop.signal is not None and checkpoint is not None:
            save_checkpoint(checkpoint, {
                "phase": phase, "step": step,
                "params": {name: p.detach().cpu().clone() for name, p in named.items()},
                "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                "sampler": sampler.state_dict(), "rng": json.dumps(rng_state())})
            return history, step
    return history, None
