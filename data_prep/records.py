"""Validation of P3-format records.

P3 rows carry `inputs_pretokenized`, `targets_pretokenized` and, for templates with answer
choices, `answer_choices`; the int `inputs`/`targets` columns are ignored because we always
re-tokenise with the chosen tokenizer. Validation runs right after loading, before any
tokenisation, so a bad dump fails in seconds rather than after an hour of work.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from .errors import DataError

MISSING = object()   # sentinel: the field is absent from the row (vs. present but null)

INPUT = "inputs_pretokenized"
TARGET = "targets_pretokenized"
CHOICES = "answer_choices"
REASONS = ("missing_field", "wrong_type", "empty_target", "target_not_in_choices")


@dataclass
class Chunk:
    """Rows of one config split as read from one file (or one hub download), column-wise."""
    origin: str
    columns: dict[str, list]
    n_rows: int

    def get(self, name: str, i: int):
        col = self.columns.get(name)
        return MISSING if col is None else col[i]


@dataclass
class Records:
    """Valid rows of one config split. `example_ids` are row indices within the split."""
    config: str
    split: str
    example_ids: list[int] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    choices: list[list[str] | None] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.example_ids)


def split_size(chunks: Iterable[Chunk]) -> int:
    return sum(c.n_rows for c in chunks)


@dataclass(frozen=True)
class _Bad:
    reason: str
    field: str
    detail: str


def _check_row(chunk: Chunk, i: int, require_choices: bool):
    """Return a _Bad for a bad row, or the parsed (input, target, choices, label)."""
    values = {}
    for name in (INPUT, TARGET):
        v = chunk.get(name, i)
        if v is MISSING or v is None:
            return _Bad("missing_field", name, "missing value")
        if not isinstance(v, str):
            return _Bad("wrong_type", name, f"expected a string, got {type(v).__name__}")
        values[name] = v
    if not values[TARGET].strip():
        return _Bad("empty_target", TARGET, "empty target")
    choices = chunk.get(CHOICES, i)
    if choices is MISSING or choices is None:
        if require_choices:
            return _Bad("missing_field", CHOICES, "held-out tasks need answer choices; missing value")
        return values[INPUT], values[TARGET], None, -1
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        return _Bad("wrong_type", CHOICES, f"expected a list of strings, got {type(choices).__name__}")
    stripped = [c.strip() for c in choices]
    target = values[TARGET].strip()
    if target not in stripped:
        return _Bad("target_not_in_choices", TARGET, f"target {target!r} is not one of the answer choices {list(choices)!r}")
    return values[INPUT], values[TARGET], list(choices), stripped.index(target)


def validate(chunks: list[Chunk], config: str, split: str, rows: range | None = None,
             require_choices: bool = False, skip_invalid: bool = False) -> Records:
    """Validate the rows of `rows` (indices within the split; all rows if None).

    Raises DataError naming file, config, row (within that file) and field, unless
    skip_invalid, in which case bad rows are dropped and counted per reason.
    """
    out = Records(config, split)
    offset = 0
    for chunk in chunks:
        lo, hi = offset, offset + chunk.n_rows
        want = range(lo, hi) if rows is None else range(max(lo, rows.start), min(hi, rows.stop))
        for gi in want:
            res = _check_row(chunk, gi - lo, require_choices)
            if isinstance(res, _Bad):
                if not skip_invalid:
                    raise DataError(res.reason, chunk.origin, config, gi - lo, res.field, res.detail)
                out.skipped[res.reason] += 1
                continue
            inp, tgt, ch, label = res
            out.example_ids.append(gi)
            out.inputs.append(inp)
            out.targets.append(tgt)
            out.choices.append(ch)
            out.labels.append(label)
        offset = hi
    return out
