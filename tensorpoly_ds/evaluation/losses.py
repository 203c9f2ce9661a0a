"""T-Few few-shot losses: LM loss + length-normalised rank loss (mc) + unlikelihood on wrong choices.

All three come from one batched pass over the answer choices (encoder once per example, decoder
over every choice), so the LM loss is the token-mean NLL of the correct choice (= target_ids).
Each term has a weight; a weight of 0 removes it from the total (it is still reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpds_common.errors import ConfigError

from ..adapters import task_routing
from .rank_classification import IGNORE, PAD_ID, ChoiceBatch, choice_scores, choice_token_logprobs, per_example

UNLIKELIHOOD_EPS = 1e-2  # inside log(1 - p + eps): keeps the loss finite when p -> 1


@dataclass(frozen=True)
class LossWeights:
    lm: float = 1.0
    mc: float = 1.0
    unlikelihood: float = 1.0
    mc_length_norm: float = 1.0  # the rank loss uses length-normalised log-probabilities

    def __post_init__(self) -> None:
        for name in ("lm", "mc", "unlikelihood", "mc_length_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or math.isnan(v):
                raise ConfigError(f"loss weights: field '{name}' = {v!r}: must be a number >= 0")


def tfew_losses(
    model: nn.Module, batch: ChoiceBatch, weights: LossWeights = LossWeights(), chunk_tokens: int = 0
) -> dict[str, torch.Tensor]:
    """{'loss', 'lm', 'mc', 'unlikelihood'} for a batch whose `labels` give the correct choice; `chunk_tokens`:
    the forward passes of choice_token_logprobs (the loss is over the whole batch either way)."""
    if bool((batch.labels < 0).any()) or bool((batch.labels >= batch.num_choices).any()):
        raise ValueError("tfew_losses: every example needs a label in [0, number of choices)")
    token_lp, valid = choice_token_logprobs(model, batch, chunk_tokens)
    correct = batch.choice_index == batch.labels.index_select(0, batch.choice_owner)  # [C]
    # LM: token mean over the correct choices.
    pos_mask = valid & correct[:, None]
    lm = -(token_lp * pos_mask).sum() / pos_mask.sum().clamp(min=1)
    # Rank loss: cross-entropy over the choices' (length-normalised) log-probabilities.
    logits = per_example(-choice_scores(token_lp, valid, weights.mc_length_norm), batch, -math.inf)
    mc = F.cross_entropy(logits, batch.labels)
    # Unlikelihood: push down every token of every wrong choice.
    neg_mask = valid & ~correct[:, None]
    if bool(neg_mask.any()):
        p = token_lp.exp().clamp(max=1.0)
        ul = -(torch.log1p(-p + UNLIKELIHOOD_EPS) * neg_mask).sum() / neg_mask.sum()
    else:
        ul = token_lp.new_zeros(())
    total = token_lp.new_zeros(())
    for w, term in ((weights.lm, lm), (weights.mc, mc), (weights.unlikelihood, ul)):
        if w:
            total = total + w * term
    return {"loss": total, "lm": lm.detach(), "mc": mc.detach(), "unlikelihood": ul.detach()}


def collate_lm(
    rows: Sequence[dict], task_ids: Sequence[int] | int = 0, pad_id: int = PAD_ID
) -> dict[str, torch.Tensor]:
    """Plain seq2seq batch (input_ids, target_ids) for multi-task LM steps."""
    n = len(rows)
    li = max(1, max(len(r["input_ids"]) for r in rows))
    lt = max(1, max(len(r["target_ids"]) for r in rows))
    input_ids = torch.full((n, li), pad_id, dtype=torch.long)
    attention = torch.zeros((n, li), dtype=torch.long)
    labels = torch.full((n, lt), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        x, y = list(r["input_ids"]), list(r["target_ids"])
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        attention[i, : len(x)] = 1
        labels[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
    ids = torch.full((n,), task_ids, dtype=torch.long) if isinstance(task_ids, int) else torch.as_tensor(list(task_ids))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "task_ids": ids}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean NLL of the targets (the multi-task pretraining objective)."""
    with task_routing(batch["task_ids"]):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            return_dict=True,
            use_cache=False,
        )
    return out.loss
