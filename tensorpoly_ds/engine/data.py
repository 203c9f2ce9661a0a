"""Training and validation batches from a prepared data directory (docs/design.md).

World-size independence: every rank opens the whole split memory-mapped (Arrow, no copy) and draws the
same seeded permutation per epoch; global step s uses the rows perm[s*G:(s+1)*G], G = micro x accum x world,
and rank r reads micro-batch m from the slice [(m*world + r)*micro : +micro]. Ranks read disjoint rows,
and the union of a step's rows does not depend on how they are split, so 2 ranks x micro 2 train on the
same rows as 1 rank x micro 4. The position (epoch, offset in samples) is saved in checkpoints, so a
resumed run continues mid-epoch where it stopped, even on another world size. The remainder of an epoch
smaller than G is dropped.

Batching (`data.batching`). `random`: step s takes perm[s*G:(s+1)*G] as it comes. `length_grouped`: the
permutation is cut into groups of M global batches (M = `data.group_size`), the M*G rows of a group are sorted
by (input length, target length), cut into M global batches of neighbouring lengths, and the group's batches
are taken in a seeded random order. A step's rows are still a function of (seed, epoch, step) and G alone, so
the world-size independence and the mid-epoch resume above hold unchanged, and an epoch trains the same rows
as `random` (the same permutation prefix), each once: per-task counts per epoch are identical, only which rows
share a step changes. Each micro-batch is a contiguous slice of its sorted global batch, so it pads to
neighbouring lengths whatever the world size. Lengths are the stored ones (before `max_input_len`), so the
order does not depend on the truncation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpds_common.errors import DataError  # noqa: F401 - re-exported: engine.data.DataError is this class

PAD_ID = 0
IGNORE_INDEX = -100
BATCHINGS = ("random", "length_grouped")


@dataclass
class PreparedData:
    """The parts of a prepared directory the engine needs (manifest tasks and tokenizer, splits)."""

    dir: Path
    tasks: list[str]
    vocab_size: int
    pad_token_id: int = 0
    eos_token_id: int = 1
    manifest: dict = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | Path) -> PreparedData:
        """Reads DIR/manifest.json through data_prep.manifest.read_manifest (validated there)."""
        from data_prep.manifest import ManifestError, read_manifest

        directory = Path(directory)
        try:
            m = read_manifest(directory)
        except ManifestError as err:
            raise DataError(str(err)) from None
        tok = m.tokenizer
        return cls(
            directory,
            list(m.tasks),
            int(tok["vocab_size"]),
            int(tok.get("pad_token_id", 0)),
            int(tok.get("eos_token_id", 1)),
            m.to_json(),
        )

    def split(self, name: str):
        """The whole split, memory-mapped (datasets.load_from_disk)."""
        import datasets

        path = self.dir / name
        if not path.is_dir():
            raise DataError(f"{path}: split {name!r} not found")
        return datasets.load_from_disk(str(path))


def truncate(ids: list[int], max_len: int | None, keep_last: int | None = None) -> list[int]:
    if max_len is None or len(ids) <= max_len:
        return list(ids)
    if keep_last is not None and ids and ids[-1] == keep_last:
        return list(ids[: max_len - 1]) + [keep_last]
    return list(ids[:max_len])


def collate(
    rows: list[dict[str, Any]],
    max_input_len: int | None = None,
    max_target_len: int | None = None,
    eos_id: int = 1,
    masked: list[bool] | None = None,
) -> dict[str, Any]:
    """Pad to the longest row: input pad 0 with attention mask; labels -100 at padding (and on rows whose
    `masked` flag is set: padding rows of evaluation batches). Other columns are passed through as lists."""
    inputs = [truncate(r["input_ids"], max_input_len) for r in rows]
    targets = [truncate(r["target_ids"], max_target_len, keep_last=eos_id) for r in rows]
    n, li, lt = len(rows), max(1, max(map(len, inputs))), max(1, max(map(len, targets)))
    input_ids = torch.full((n, li), PAD_ID, dtype=torch.long)
    attention = torch.zeros((n, li), dtype=torch.long)
    labels = torch.full((n, lt), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(zip(inputs, targets)):
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        attention[i, : len(x)] = 1
        if not (masked and masked[i]):
            labels[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "task_ids": torch.as_tensor([int(r["task_id"]) for r in rows], dtype=torch.long),
    }
    for key in rows[0]:
        if key not in ("input_ids", "target_ids", "task_id") and key not in batch:
            batch[key] = [r[key] for r in rows]
    return batch


def _rows(ds, indices: list[int]) -> list[dict[str, Any]]:
    cols = ds[indices] if indices else {c: [] for c in ds.column_names}
    names = list(cols)
    return [{k: cols[k][i] for k in names} for i in range(len(indices))]


def row_lengths(ds) -> np.ndarray:
    """(n, 2) int64: the stored lengths of input_ids and target_ids (0 where a dataset has no target_ids).
    A datasets.Dataset is read as Arrow list offsets (no row is decoded); a table with its own `length_keys()`
    (adaptation's choice rows: the longest answer choice stands for the target) gives those; anything else is
    read row by row."""
    if callable(getattr(ds, "length_keys", None)):
        return np.asarray(ds.length_keys(), dtype=np.int64).reshape(len(ds), 2)
    names = list(getattr(ds, "column_names", []))
    wanted = [c for c in ("input_ids", "target_ids") if c in names]
    if "input_ids" not in wanted:
        raise DataError(
            "length-grouped batching needs an input_ids column; the training rows have "
            f"{', '.join(names) or 'no named columns'}"
        )
    out = np.zeros((len(ds), 2), dtype=np.int64)
    if hasattr(ds, "with_format") and hasattr(ds, "select_columns"):
        import pyarrow.compute as pc

        table = ds.select_columns(wanted).with_format("arrow")[:]
        for j, c in enumerate(wanted):
            out[:, j] = pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False)
        return out
    cols = ds[list(range(len(ds)))]
    for j, c in enumerate(wanted):
        out[:, j] = [len(v) for v in cols[c]]
    return out


class TrainStream:
    """Deterministic, resumable, world-size independent stream of this rank's micro-batches."""

    def __init__(
        self,
        ds,
        *,
        seed: int,
        micro_batch: int,
        grad_accum: int,
        rank: int = 0,
        world_size: int = 1,
        max_input_len: int | None = None,
        max_target_len: int | None = None,
        eos_id: int = 1,
        collate_fn: Callable | None = None,
        batching: str = "random",
        group_size: int = 4,
    ) -> None:
        if batching not in BATCHINGS:
            raise DataError(f"batching {batching!r}: valid values: {', '.join(BATCHINGS)}")
        if group_size < 1:
            raise DataError(f"group_size {group_size!r}: must be >= 1 (global batches sorted together)")
        self.ds, self.seed = ds, seed
        self.micro, self.accum, self.rank, self.world = micro_batch, grad_accum, rank, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        self.max_input_len, self.max_target_len, self.eos_id = max_input_len, max_target_len, eos_id
        self.collate_fn = collate_fn
        self.batching, self.group_size = batching, group_size
        self.n = len(ds)
        if self.n < self.global_batch:
            raise DataError(
                f"the training split has {self.n} rows, fewer than one global batch "
                f"({micro_batch} x {grad_accum} x {world_size} = {self.global_batch})"
            )
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = -1, None
        self._lengths: np.ndarray | None = None
        self._group_key, self._group = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = row_lengths(self.ds)
        return self._lengths

    def mean_step_targets(self) -> float:
        """Target tokens of a global step averaged over the split (after max_target_len): the loss normaliser
        of length-grouped steps (trainer.Trainer)."""
        targets = self.lengths()[:, 1]
        if self.max_target_len is not None:
            targets = np.minimum(targets, self.max_target_len)
        return float(targets.mean()) * self.global_batch

    def group(self, epoch: int, index: int) -> np.ndarray:
        """(steps, G) row indices: group `index` of the epoch's length-sorted groups, its batches in their
        seeded order (the last group of an epoch may hold fewer than group_size batches)."""
        if self._group_key != (epoch, index):
            g = self.global_batch
            first = index * self.group_size
            steps = min(self.group_size, self.n // g - first)
            rows = self.permutation(epoch)[first * g : (first + steps) * g].numpy()
            lengths = self.lengths()[rows]
            # last key first: input length, then target length, then the permutation's order (total order)
            order = np.lexsort((np.arange(len(rows)), lengths[:, 1], lengths[:, 0]))
            batches = rows[order].reshape(steps, g)
            shuffle = np.random.default_rng([self.seed % 2**63, epoch, index]).permutation(steps)
            self._group, self._group_key = batches[shuffle], (epoch, index)
        return self._group

    def global_step_rows(self, epoch: int, offset: int) -> list[int]:
        """The G rows of the global step starting at `offset` samples into `epoch`."""
        if self.batching == "random":
            return self.permutation(epoch)[offset : offset + self.global_batch].tolist()
        step = offset // self.global_batch
        return self.group(epoch, step // self.group_size)[step % self.group_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "offset": self.offset, "samples_per_epoch": self.n}
        if self.batching != "random":  # a random run's position reads as before (older checkpoints too)
            state.update(batching=self.batching, group_size=self.group_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("samples_per_epoch", self.n)) != self.n:
            raise DataError(
                f"the checkpoint's data position is for {state['samples_per_epoch']} training rows, "
                f"this split has {self.n}"
            )
        saved = (state.get("batching", "random"), int(state.get("group_size", self.group_size)))
        here = (self.batching, self.group_size)
        if saved[0] != here[0] or (here[0] != "random" and saved[1] != here[1]):
            # another order would repeat some rows of the current epoch and skip others
            raise DataError(
                f"the checkpoint's data position is for data.batching={saved[0]}"
                + (f", data.group_size={saved[1]}" if saved[0] != "random" else "")
                + f"; this run has data.batching={here[0]}"
                + (f", data.group_size={here[1]}" if here[0] != "random" else "")
                + ": resume with the checkpoint's settings, or start a new run to change them"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def step_indices(self) -> list[list[int]]:
        """Row indices of this rank's micro-batches for the next step (advances the position)."""
        if self.offset + self.global_batch > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        step = self.global_step_rows(self.epoch, self.offset)
        self.offset += self.global_batch
        out = []
        for m in range(self.accum):
            start = (m * self.world + self.rank) * self.micro
            out.append(step[start : start + self.micro])
        return out

    def next_step(self) -> list[dict[str, Any]]:
        batches = []
        for idx in self.step_indices():
            rows = _rows(self.ds, idx)
            batches.append(
                self.collate_fn(rows)
                if self.collate_fn
                else collate(rows, self.max_input_len, self.max_target_len, self.eos_id)
            )
        return batches


def eval_batches(
    ds,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_rows: int | None = None,
    max_input_len: int | None = None,
    max_target_len: int | None = None,
    eos_id: int = 1,
    collate_fn: Callable | None = None,
) -> Iterator[dict[str, Any]]:
    """This rank's validation batches: rows rank, rank+world, ...; every rank yields the same number of
    batches (ZeRO-3 needs equal forward passes), the last ones padded by repeating a row with its labels
    masked out (they add nothing to loss sums or token counts)."""
    n = len(ds) if max_rows is None else min(len(ds), max_rows)
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size)
    n_batches = -(-per_rank // batch_size) if n else 0
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        masked = [False] * len(idx)
        while len(idx) < batch_size:
            idx.append(mine[0] if mine else 0)
            masked.append(True)
        rows = _rows(ds, idx)
        if collate_fn:
            yield collate_fn(rows, masked)
        else:
            yield collate(rows, max_input_len, max_target_len, eos_id, masked=masked)
