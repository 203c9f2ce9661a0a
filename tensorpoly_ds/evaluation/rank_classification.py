"""Rank classification: score every answer choice of an example and predict the best one.

The encoder runs once per example; the decoder scores all choices of a batch in one pass (encoder
states and the decoder task ids repeated per choice). A choice's score is its summed token NLL,
optionally divided by (number of target tokens incl. EOS) ** length_norm; the prediction is the
argmin. Examples may have different numbers of choices and choices different lengths: everything is
flattened, padded and masked.

Data parallel / ZeRO-3: `evaluate` gives every rank the same number of batches (the last ones
padded with duplicates that are dropped when gathering), so collectives inside the forward pass
(ZeRO-3 parameter gathers) line up; the results are gathered with all_gather_object.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from tpds_common.files import atomic_write_text

from ..adapters import AdapterLinear, task_routing
from .chunking import example_lengths, plan_chunks

PAD_ID = 0
IGNORE = -100


@dataclass
class ChoiceBatch:
    """A padded batch of examples with their flattened choices."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    choice_labels: torch.Tensor  # [C, T] choice token ids, IGNORE where padded
    choice_owner: torch.Tensor  # [C] index of the example each choice belongs to (non-decreasing)
    choice_index: torch.Tensor  # [C] index of the choice within its example
    num_choices: torch.Tensor  # [B]
    labels: torch.Tensor  # [B] correct choice (-1 if unknown)
    task_ids: torch.Tensor  # [B]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> ChoiceBatch:
        return ChoiceBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    def choice_starts(self) -> tuple[list[int], np.ndarray]:
        """(choices per example, index of each example's first choice in [C]): choices are grouped by example.
        One read from the device, not one per example."""
        counts = self.num_choices.tolist()
        return counts, np.cumsum([0, *counts[:-1]])

    def select(self, examples: Sequence[int]) -> tuple[ChoiceBatch, torch.Tensor]:
        """The batch of `examples` (in that order), padded only to their own longest input and choice, and the
        indices of its choices in this batch's [C] order."""
        device = self.input_ids.device
        rows = torch.as_tensor(list(examples), dtype=torch.long, device=device)
        counts, starts = self.choice_starts()
        choices = torch.as_tensor(np.concatenate([np.arange(starts[e], starts[e] + counts[e]) for e in examples]))
        choices = choices.to(device)
        mask = self.attention_mask.index_select(0, rows)
        width = max(1, int(mask.sum(dim=1).max()))
        labels = self.choice_labels.index_select(0, choices)
        choice_width = int((labels != IGNORE).sum(dim=1).max())
        num_choices = self.num_choices.index_select(0, rows)
        sub = ChoiceBatch(
            self.input_ids.index_select(0, rows)[:, :width],
            mask[:, :width],
            labels[:, :choice_width],
            torch.repeat_interleave(torch.arange(len(examples), device=device), num_choices),
            self.choice_index.index_select(0, choices),
            num_choices,
            self.labels.index_select(0, rows),
            self.task_ids.index_select(0, rows),
        )
        return sub, choices


def collate_choices(rows: Sequence[dict], task_id: int | Sequence[int] = 0, pad_id: int = PAD_ID) -> ChoiceBatch:
    """rows: dicts with input_ids, choice_ids (list of lists) and optionally label."""
    if not rows:
        raise ValueError("collate_choices: empty batch")
    ids = [list(r["input_ids"]) for r in rows]
    width = max(1, max(len(x) for x in ids))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        attention[i, : len(x)] = 1
    choices, owner, index, counts = [], [], [], []
    for i, r in enumerate(rows):
        cs = [list(c) for c in r["choice_ids"]]
        if not cs:
            raise ValueError(f"collate_choices: example {i} has no answer choices")
        for j, c in enumerate(cs):
            if not c:
                raise ValueError(f"collate_choices: example {i} choice {j} is empty (choices end with EOS)")
            choices.append(c)
            owner.append(i)
            index.append(j)
        counts.append(len(cs))
    t = max(len(c) for c in choices)
    labels = torch.full((len(choices), t), IGNORE, dtype=torch.long)
    for j, c in enumerate(choices):
        labels[j, : len(c)] = torch.as_tensor(c, dtype=torch.long)
    if isinstance(task_id, int):
        task_ids = torch.full((len(rows),), task_id, dtype=torch.long)
    else:
        task_ids = torch.as_tensor(list(task_id), dtype=torch.long)
    return ChoiceBatch(
        input_ids,
        attention,
        labels,
        torch.as_tensor(owner),
        torch.as_tensor(index),
        torch.as_tensor(counts),
        torch.as_tensor([int(r.get("label", -1)) for r in rows]),
        task_ids,
    )


def shift_right(labels: torch.Tensor, start_id: int = 0, pad_id: int = PAD_ID) -> torch.Tensor:
    out = torch.full_like(labels, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE, pad_id)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DeepSpeed engine -> HF model


def choice_token_logprobs(
    model: nn.Module, batch: ChoiceBatch, chunk_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every choice token [C, T] and the mask of real tokens [C, T].

    One encoder pass over the B examples, one decoder pass over the C choices; with `chunk_tokens` > 0, one
    such pair per chunk of examples of similar length (evaluation.chunking), each padded to its own lengths."""
    if chunk_tokens:
        return _chunked_token_logprobs(model, batch, chunk_tokens)
    logits = _choice_logits(model, batch)
    valid = batch.choice_labels != IGNORE
    targets = batch.choice_labels.clamp(min=0)
    # The [C, V, T] form gives the rounding every published result was made with; the chunked path's flat form
    # is several times faster on CPU and differs in the last bits.
    token_lp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return token_lp.masked_fill(~valid, 0.0), valid


def _choice_logits(model: nn.Module, batch: ChoiceBatch, real: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 (or wider) logits [C, T, V] of every choice position: one encoder and one decoder pass. With
    `real` (a [C, T] mask; the chunked path), the output layer sees only those positions' decoder states: logits
    [N, V]."""
    hf = _unwrap(model)
    head = hf.get_output_embeddings() if real is not None else None
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][real], *args[1:])) if head is not None else None
    try:
        logits = _forward_choices(model, hf, batch)
    finally:
        if hook is not None:
            hook.remove()
    if real is not None and head is None:  # a model without a separate output layer: select afterwards
        logits = logits[real]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept


CROSS_ATTENTION_INPUTS = ("EncDecAttention.k", "EncDecAttention.v")  # T5's projections of the encoder states


def _cross_attention_inputs(hf: nn.Module) -> list[nn.Module]:
    """T5's frozen key and value projections of the encoder states (the adapter's `base` where one wraps them);
    none in models without these modules."""
    return [
        module.base if isinstance(module, AdapterLinear) else module
        for name, module in hf.named_modules()
        if name.endswith(CROSS_ATTENTION_INPUTS)
    ]


@contextlib.contextmanager
def _cross_attention_once_per_example(linears: list[nn.Module], batch: ChoiceBatch):
    """The decoder sees the encoder states repeated once per choice, so T5's cross-attention projects the same
    rows once per choice. Inside this context the `linears` (_cross_attention_inputs; an adapter's own path is
    untouched) run on each example's first copy, and their outputs are repeated per choice: the same values,
    1 / choices of the work."""
    first = torch.as_tensor(batch.choice_starts()[1], device=batch.choice_owner.device)
    owner = batch.choice_owner
    handles = []
    for linear in linears:
        handles.append(linear.register_forward_pre_hook(lambda _, args: (args[0].index_select(0, first),)))
        handles.append(linear.register_forward_hook(lambda _, __, out: out.index_select(0, owner)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_choices(model: nn.Module, hf: nn.Module, batch: ChoiceBatch) -> torch.Tensor:
    start = getattr(hf.config, "decoder_start_token_id", 0) or 0
    dec_ids = batch.task_ids.index_select(0, batch.choice_owner)
    with task_routing(batch.task_ids, decoder_task_ids=dec_ids):
        enc = hf.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_dict=True)
        hidden = enc.last_hidden_state.index_select(0, batch.choice_owner)  # repeat_interleave per choice
        mask = batch.attention_mask.index_select(0, batch.choice_owner)
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=shift_right(batch.choice_labels, start),
            return_dict=True,
            use_cache=False,
        )
    return out.logits


def _chunked_token_logprobs(model: nn.Module, batch: ChoiceBatch, chunk_tokens: int):
    valid = batch.choice_labels != IGNORE
    lengths = example_lengths(batch.attention_mask, valid.sum(dim=1), batch.choice_owner)
    kv_inputs = _cross_attention_inputs(_unwrap(model))  # found once per batch, hooked per pass
    pieces, order = [], []
    for examples in plan_chunks(*lengths, chunk_tokens):
        sub, choices = batch.select(examples)
        real = sub.choice_labels != IGNORE
        # the output layer and the log-softmax over the vocabulary at real tokens only, rows contiguous
        with _cross_attention_once_per_example(kv_inputs, sub):
            logits = _choice_logits(model, sub, real)
        token_lp = logits.new_zeros(real.shape)
        token_lp[real] = -F.cross_entropy(logits, sub.choice_labels[real], reduction="none")
        pieces.append(F.pad(token_lp, (0, valid.shape[1] - token_lp.shape[1])))
        order.append(choices)
    inverse = torch.empty_like(batch.choice_owner)
    chunk_order = torch.cat(order)
    inverse[chunk_order] = torch.arange(len(chunk_order), device=chunk_order.device)
    return torch.cat(pieces).index_select(0, inverse), valid


def choice_scores(token_lp: torch.Tensor, valid: torch.Tensor, length_norm: float = 0.0) -> torch.Tensor:
    """Score per choice [C]: summed NLL / length ** length_norm (lower is better)."""
    nll = -token_lp.sum(dim=1)
    if length_norm:
        nll = nll / valid.sum(dim=1).clamp(min=1).to(nll.dtype) ** length_norm
    return nll


def per_example(values: torch.Tensor, batch: ChoiceBatch, fill: float) -> torch.Tensor:
    """Scatter per-choice values [C] into [B, max_choices], `fill` where an example has fewer choices."""
    width = int(batch.num_choices.max())
    out = values.new_full((batch.batch_size, width), fill)
    out[batch.choice_owner, batch.choice_index] = values
    return out


@torch.no_grad()
def score_batch(
    model: nn.Module, batch: ChoiceBatch, length_norm: float = 0.0, chunk_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B, max_choices] with +inf padding, predictions [B])."""
    token_lp, valid = choice_token_logprobs(model, batch, chunk_tokens)
    scores = per_example(choice_scores(token_lp, valid, length_norm), batch, math.inf)
    return scores, scores.argmin(dim=1)


# --- distributed evaluation ------------------------------------------------------------------------


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_plan(n: int, batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, bool]]]:
    """This rank's batches of (example index, is_real). Ranks take strided shares; every rank gets
    the same number of batches and the same batch sizes; padding repeats index 0 and is marked."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_rank = math.ceil(n / world_size) if n else 0
    mine = [(i, True) for i in range(rank, n, world_size)]
    mine += [(0, False)] * (per_rank - len(mine))
    return [mine[s : s + batch_size] for s in range(0, per_rank, batch_size)]


def length_keys(rows: Sequence[dict]) -> np.ndarray:
    """(n, 2) int64 sort keys of rows: the input length, then the longest answer choice (choice rows) or the
    target length (LM rows; 0 without either). What a batch of the rows pads to."""
    keys = np.zeros((len(rows), 2), dtype=np.int64)
    for i in range(len(rows)):
        row = rows[i]
        keys[i, 0] = len(row["input_ids"])
        if row.get("choice_ids"):
            keys[i, 1] = max(len(c) for c in row["choice_ids"])
        elif row.get("target_ids") is not None:
            keys[i, 1] = len(row["target_ids"])
    return keys


def length_order(rows: Sequence[dict]) -> list[int]:
    """Row indices by length (length_keys, then the row index): the evaluation order of `length_sorted`."""
    keys = length_keys(rows)
    return np.lexsort((np.arange(len(keys)), keys[:, 1], keys[:, 0])).tolist()


def _device_of(model: nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(_unwrap(model).parameters()).device
    except StopIteration:
        return torch.device("cpu")


def evaluate(
    model: nn.Module,
    rows: Sequence[dict] | Any,
    *,
    batch_size: int = 16,
    length_norm: float = 0.0,
    task_id: int = 0,
    device: torch.device | None = None,
    order: Sequence[int] | None = None,
    chunk_tokens: int = 0,
) -> list[dict]:
    """Rank-classify `rows` (a list of dicts or a datasets.Dataset) on every rank; returns the
    per-example records (in input order) on every rank. Call it on all ranks together.

    `order` (a permutation of the row indices, e.g. length_order(rows)): the order in which rows fill the
    batches (ranks take strided shares of it). Only the batching changes: the records are those of the rows in
    input order, with their indices, whatever the order. `chunk_tokens`: score_batch's forward passes per batch."""
    rank, world = _dist()
    n = len(rows)
    if order is not None and sorted(order) != list(range(n)):
        raise ValueError(f"evaluate: order is not a permutation of the {n} row indices")
    device = device or _device_of(model)
    was_training = model.training
    model.eval()
    local: list[dict] = []
    try:
        for plan in rank_plan(n, batch_size, rank, world):
            if order is not None:  # plan positions -> row indices (padding repeats the first row of `order`)
                plan = [(order[p], real) for p, real in plan]
            examples = [rows[i] for i, _ in plan]
            batch = collate_choices(examples, task_id).to(device)
            scores, preds = score_batch(model, batch, length_norm, chunk_tokens)
            scores, preds = scores.cpu(), preds.cpu()
            for b, (i, real) in enumerate(plan):
                if not real:
                    continue
                ex = examples[b]
                c = int(batch.num_choices[b])
                local.append(
                    {
                        "index": i,
                        "task_name": ex.get("task_name", ""),
                        "template": ex.get("template", ""),
                        "example_id": int(ex.get("example_id", i)),
                        "label": int(ex.get("label", -1)),
                        "prediction": int(preds[b]),
                        "scores": [float(s) for s in scores[b, :c]],
                    }
                )
    finally:
        model.train(was_training)
    if world > 1:
        gathered: list[list[dict] | None] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        local = [r for part in gathered for r in (part or [])]
    seen: dict[int, dict] = {}
    for r in local:
        seen.setdefault(r["index"], r)  # duplicates (padding) were already dropped; guard anyway
    records = [seen[i] for i in sorted(seen)]
    if len(records) != n:
        raise RuntimeError(f"rank classification gathered {len(records)} of {n} examples")
    for r in records:
        r["correct"] = r["prediction"] == r["label"]
    return records


def accuracy(records: Iterable[dict]) -> dict:
    """Overall, per task and per (task, template) accuracy of evaluation records."""
    records = list(records)
    by_task: dict[str, list[bool]] = defaultdict(list)
    by_template: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_task[r["task_name"]].append(bool(r["correct"]))
        by_template[r["task_name"]][r["template"]].append(bool(r["correct"]))

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "accuracy": mean([bool(r["correct"]) for r in records]),
        "examples": len(records),
        "per_task": {t: mean(v) for t, v in sorted(by_task.items())},
        "per_template": {t: {k: mean(v) for k, v in sorted(d.items())} for t, d in sorted(by_template.items())},
    }


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path
