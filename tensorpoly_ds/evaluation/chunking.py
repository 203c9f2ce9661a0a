"""Chunked forward passes over a choice batch (the adaptation job's `chunk_tokens`).

A batch is padded to its longest input and its longest answer choice. A batch of few-shot rows cannot be
sorted away from that: at k = 32 and batch 8 a window of length-sorted rows is one epoch, and the choices of one
example differ in length whatever the order of the rows. Splitting the batch into forward passes of examples
of similar length, each padded only to its own longest input and choice, removes most of what is left. The
scores and the loss are the same in exact arithmetic: padded positions are masked out of every attention and
every sum, so what changes is how many padded slots are computed, and rounding.

A chunk is a run of the batch's examples in order of (input length, longest choice, index), grown while its
slots (examples x longest input + choices x longest choice, padding included) stay within the budget; an
example over the budget alone is a chunk of its own.
"""

from __future__ import annotations

import numpy as np
import torch


def example_lengths(attention_mask: torch.Tensor, choice_lengths: torch.Tensor, choice_owner: torch.Tensor):
    """(input length, longest choice, number of choices) per example, as int64 numpy arrays."""
    inputs = attention_mask.sum(dim=1).cpu().numpy().astype(np.int64)
    owner = choice_owner.cpu().numpy()
    lengths = choice_lengths.cpu().numpy().astype(np.int64)
    longest = np.zeros(len(inputs), dtype=np.int64)
    np.maximum.at(longest, owner, lengths)
    counts = np.bincount(owner, minlength=len(inputs)).astype(np.int64)
    return inputs, longest, counts


def plan_chunks(inputs: np.ndarray, longest: np.ndarray, counts: np.ndarray, chunk_tokens: int) -> list[list[int]]:
    """Example indices per forward pass, for a budget of `chunk_tokens` padded input + decoder slots."""
    if chunk_tokens < 1:
        raise ValueError(f"plan_chunks: chunk_tokens must be >= 1, got {chunk_tokens}")
    order = np.lexsort((np.arange(len(inputs)), longest, inputs)).tolist()
    chunks: list[list[int]] = []
    current: list[int] = []
    width = choice_width = choices = 0
    for i in order:
        w, cw, c = max(width, int(inputs[i])), max(choice_width, int(longest[i])), choices + int(counts[i])
        if current and (len(current) + 1) * w + c * cw > chunk_tokens:
            chunks.append(current)
            current, w, cw, c = [], int(inputs[i]), int(longest[i]), int(counts[i])
        current.append(i)
        width, choice_width, choices = w, cw, c
    if current:
        chunks.append(current)
    return chunks
