"""Rank-classification evaluation and the T-Few few-shot losses."""

from .losses import LossWeights, collate_lm, lm_loss, tfew_losses
from .rank_classification import (
    ChoiceBatch,
    accuracy,
    choice_scores,
    choice_token_logprobs,
    collate_choices,
    evaluate,
    length_keys,
    length_order,
    rank_plan,
    score_batch,
    write_jsonl,
)

__all__ = [
    "ChoiceBatch",
    "LossWeights",
    "accuracy",
    "choice_scores",
    "choice_token_logprobs",
    "collate_choices",
    "collate_lm",
    "evaluate",
    "length_keys",
    "length_order",
    "lm_loss",
    "rank_plan",
    "score_batch",
    "tfew_losses",
    "write_jsonl",
]
