"""Seed-keyed few-shot sampling.

The generator is seeded from sha256(task, seed) alone, so a task's sample does not depend on
which other tasks are prepared or in what order, nor on PYTHONHASHSEED.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(task: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"few_shot|{task}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample(task: str, seed: int, candidates: list[int], k: int) -> list[int]:
    """k distinct example ids from `candidates` (all of them if fewer), in sampled order."""
    pool = sorted(set(candidates))
    if k >= len(pool):
        return pool
    picks = rng_for(task, seed).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in picks]
