"""Validation of P3-format records, chunk by chunk.

P3 rows carry `inputs_pretokenized`, `targets_pretokenized` and, for templates with answer
choices, `answer_choices`; the int `inputs`/`targets` columns are ignored because we always
re-tokenise with the chosen tokenizer. A chunk is validated before any of it is tokenised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import DataError

MISSING = object()  # sentinel: the field is absent from the row (vs. present but null)

INPUT = "inputs_pretokenized"
TARGET = "targets_pretokenized"
CHOICES = "answer_choices"
REASONS = ("missing_field", "wrong_type", "empty_target", "target_not_in_choices")


@dataclass
class Chunk:
    """Consecutive rows of one config split read from one file, column-wise.
    `first` is the row index of the first row within that file, `offset` within the split."""

    origin: str
    columns: dict[str, list]
    n_rows: int
    first: int = 0
    offset: int = 0

    def get(self, name: str, i: int):
        col = self.columns.get(name)
        return MISSING if col is None else col[i]


@dataclass
class Records:
    """Valid rows of (part of) one config split. `example_ids` are row indices within the split."""

    config: str
    split: str
    example_ids: list[int] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    choices: list[list[str] | None] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.example_ids)


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
        return _Bad(
            "target_not_in_choices", TARGET, f"target {target!r} is not one of the answer choices {list(choices)!r}"
        )
    return values[INPUT], values[TARGET], list(choices), stripped.index(target)


def validate_chunks(
    chunks: Iterable[Chunk],
    config: str,
    split: str,
    skipped: Counter,
    require_choices: bool = False,
    skip_invalid: bool = False,
) -> Iterator[Records]:
    """The valid rows of each chunk, as one Records per chunk (possibly empty).

    Raises DataError naming file, config, row (within that file) and field, unless skip_invalid,
    in which case bad rows are dropped and counted per reason in `skipped`.
    """
    for chunk in chunks:
        out = Records(config, split)
        for i in range(chunk.n_rows):
            res = _check_row(chunk, i, require_choices)
            if isinstance(res, _Bad):
                if not skip_invalid:
                    raise DataError(res.reason, chunk.origin, config, chunk.first + i, res.field, res.detail)
                skipped[res.reason] += 1
                continue
            inp, tgt, ch, label = res
            out.example_ids.append(chunk.offset + i)
            out.inputs.append(inp)
            out.targets.append(tgt)
            out.choices.append(ch)
            out.labels.append(label)
        yield out
