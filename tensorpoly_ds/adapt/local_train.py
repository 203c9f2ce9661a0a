"""The local backend of the training loop (engine.loop) for adaptation jobs: plain one-process PyTorch (loss
hook, warmup + linear decay, grad-norm clipping) that honours stop requests.

After every optimizer step the loop checks the stop flag (SIGTERM/SIGINT/SIGUSR1, tensorpoly_ds.engine.stop);
when set it writes OUT/local_checkpoint.pt (trainable parameters, optimizer, schedule, sampler and RNG
states; atomic) and returns. The next run of the job loads it and continues exactly where the stopped one
would have: the same batches, the same dropout masks, the same updates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tpds_common.errors import CheckpointError
from tpds_common.files import atomic_output

from ..adapters import routing_tables
from ..engine.checkpoint import rng_state, set_rng_state
from ..engine.loop import GRAD_NORM, TRAIN_LOSS, TrainLoop, lr_factor, lr_key, train_key

CHECKPOINT_FILE = "local_checkpoint.pt"


class LocalCheckpointError(CheckpointError):
    """OUT/local_checkpoint.pt cannot be read or does not match the job (--force starts over)."""


def build_optimizer(model: nn.Module, name: str, lr: float, routing_lr: float | None) -> torch.optim.Optimizer:
    tables = routing_tables(model)
    routing = [t.logits for t in tables.values() if t.logits.requires_grad]
    rid = {id(p) for p in routing}
    modules = [p for p in model.parameters() if p.requires_grad and id(p) not in rid]
    groups = [
        g
        for g in (
            {"params": modules, "lr": lr, "name": "modules"},
            {"params": routing, "lr": routing_lr or lr, "name": "routing"},
        )
        if g["params"]
    ]
    if not groups:
        from .job import JobError

        raise JobError("no trainable parameters")
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


class EpochSampler:
    """Batches of row indices: a fresh seeded permutation per epoch, appended to a queue that batches are cut
    from (rows smaller than a batch repeat; a batch may straddle two epochs).

    Length-grouped (`lengths` given, one sort key per row, e.g. (input length, longest choice)): each epoch's
    permutation, the same one the random order draws, is cut into windows of `group_size` batches; a window's
    rows are sorted by length (then by their place in the permutation), cut into batches, and the batches are
    taken in a seeded random order. The windows start where the queue's batch grid does (the rows that complete
    a batch begun in the previous epoch come first, unsorted), so every batch but that one holds rows of
    neighbouring lengths. The order is a function of the seed alone, and each epoch is still a permutation:
    every row once per epoch, the same rows as the random order's epoch."""

    def __init__(
        self, n: int, batch_size: int, seed: int, lengths: np.ndarray | None = None, group_size: int = 4
    ) -> None:
        if n < 1:
            from .job import JobError

            raise JobError("no training rows")
        self.n, self.batch, self.gen = n, batch_size, torch.Generator().manual_seed(seed)
        self.queue: list[int] = []
        self.seed, self.group_size, self.epoch = seed, group_size, 0
        self.lengths = None if lengths is None else np.asarray(lengths).reshape(n, -1)

    @property
    def batching(self) -> str:
        return "random" if self.lengths is None else "length_grouped"

    def next(self) -> list[int]:
        while len(self.queue) < self.batch:
            perm = torch.randperm(self.n, generator=self.gen).tolist()
            self.queue += perm if self.lengths is None else self.grouped(perm, len(self.queue))
            self.epoch += 1
        out, self.queue = self.queue[: self.batch], self.queue[self.batch :]
        return out

    def grouped(self, perm: list[int], queued: int) -> list[int]:
        """The epoch's permutation in length-grouped order, given `queued` rows already waiting in the queue."""
        head = (self.batch - queued % self.batch) % self.batch
        rows, out = np.asarray(perm[head:], dtype=np.int64), list(perm[:head])
        window = self.batch * self.group_size
        for w, start in enumerate(range(0, len(rows), window)):
            chunk = rows[start : start + window]
            keys = self.lengths[chunk]
            # np.lexsort sorts by its last key first: lengths in column order, then the place in the permutation
            order = np.lexsort((np.arange(len(chunk)), *keys.T[::-1]))
            full = len(chunk) // self.batch
            batches = [chunk[order][b * self.batch : (b + 1) * self.batch] for b in range(full)]
            shuffle = np.random.default_rng([self.seed % 2**63, self.epoch, w]).permutation(full)
            # a partial batch (the epoch's last rows) stays last, so the batch grid stays on the sorted batches
            out += [int(i) for b in shuffle for i in batches[b]] + chunk[order][full * self.batch :].tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"generator": self.gen.get_state(), "queue": list(self.queue)}
        if self.lengths is not None:  # a random sampler's state reads as before (older checkpoints too)
            state.update(epoch=self.epoch, batching=self.batching, group_size=self.group_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, group = state.get("batching", "random"), state.get("group_size")
        if saved != self.batching or (saved != "random" and group != self.group_size):
            # another order would repeat some rows of the current epoch and skip others
            raise LocalCheckpointError(
                f"the checkpoint's sampler is batching={saved}"
                + (f", group_size={group}" if group else "")
                + f"; this job has batching={self.batching}, group_size={self.group_size}: rerun the "
                "original job to resume it, or --force to start over"
            )
        self.gen.set_state(state["generator"])
        self.queue = list(state["queue"])
        self.epoch = int(state.get("epoch", 0))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the reader raises, name the file
        raise LocalCheckpointError(
            f"{path} is unreadable ({type(err).__name__}: {str(err)[:300]}); rerun with --force to start the job over"
        ) from None


class LocalTrainer(TrainLoop):
    """The plain-PyTorch backend of the training loop (engine.loop): one process, no DeepSpeed engine and no
    process group, for adaptation jobs with `trainer: local` (tiny in-process jobs, a tree without the engine).
    Each step: zero_grad, forward + backward of `grad_accum` micro-batches (loss / grad_accum), clipping, the
    optimizer and schedule steps. A stop request (with `stop` and `checkpoint`) is honoured after the current
    step: the checkpoint is written and the loop returns."""

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int,
        sampler: EpochSampler,
        make_batch: Callable[[list[int]], Any],
        loss_fn: Callable[[Any], dict],
        optimizer: torch.optim.Optimizer,
        warmup_ratio: float,
        clip: float,
        grad_accum: int = 1,
        on_step: Callable[[int, dict], None] | None = None,
        stop=None,
        checkpoint: Path | None = None,
        phase: str = "fewshot",
    ):
        self.model, self.sampler, self.make_batch, self.loss_fn = model, sampler, make_batch, loss_fn
        self.optimizer, self.clip, self.grad_accum, self.on_step = optimizer, clip, grad_accum, on_step
        self.stop, self.checkpoint_path, self.phase = stop, checkpoint, phase
        self.total_steps, self.step_no, self.history = steps, 0, []
        self.setup(warmup_ratio)

    def setup(self, warmup_ratio: float) -> None:
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup_ratio, "linear")
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.named = {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def resume(self, state: dict[str, Any]) -> None:
        """Continue a stopped loop from its checkpoint (a loaded CHECKPOINT_FILE of this phase)."""
        with torch.no_grad():
            for name, value in state["params"].items():
                self.named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(json.loads(state["rng"]))
        self.step_no = int(state["step"])

    def run(self, resume_state: dict[str, Any] | None = None) -> tuple[list[dict], int | None]:
        """Returns (history of this call, step at which a stop request ended the loop or None)."""
        if resume_state is not None:
            self.resume(resume_state)
        self.model.train()
        return self.history, (self.step_no if self.loop() == "requeue" else None)

    def step(self) -> dict[str, float]:
        optimizer, accum = self.optimizer, self.grad_accum
        optimizer.zero_grad(set_to_none=True)
        lrs = {lr_key(g["name"]): g["lr"] for g in optimizer.param_groups}  # the learning rates this step uses
        stats: dict[str, float] = {}
        for _ in range(accum):
            out = self.loss_fn(self.make_batch(self.sampler.next()))
            (out["loss"] / accum).backward()
            for k, v in out.items():
                key = train_key(k)
                stats[key] = stats.get(key, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / accum
        if self.clip > 0:
            stats[GRAD_NORM] = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        optimizer.step()
        self.sched.step()
        self.step_no += 1
        stats.update(lrs)
        if not math.isfinite(stats[TRAIN_LOSS]):
            raise FloatingPointError(f"step {self.step_no}: non-finite loss {stats[TRAIN_LOSS]}")
        return stats

    def record(self, metrics: dict[str, float]) -> None:
        self.history.append({"step": self.step_no, **metrics})
        if self.on_step is not None:
            self.on_step(self.step_no, metrics)

    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop.signal is not None and self.checkpoint_path is not None

    def on_stop(self) -> None:
        self.checkpoint()

    def checkpoint(self) -> None:
        """CHECKPOINT_FILE: trainable parameters, optimizer, schedule, sampler and RNG states (atomic)."""
        save_checkpoint(
            self.checkpoint_path,
            {
                "phase": self.phase,
                "step": self.step_no,
                "params": {name: p.detach().cpu().clone() for name, p in self.named.items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.sched.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": json.dumps(rng_state()),
            },
        )
