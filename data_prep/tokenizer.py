"""Tokenizers: a Hugging Face tokenizer by name/path, or the offline `embedded` one; batched
encoding straight into Arrow arrays.

The embedded tokenizer is a WordLevel model over the prepared text, with T5's special-token
layout (pad=0 "<pad>", eos=1 "</s>", unk=2 "<unk>") so downstream code needs no special cases.
Its vocabulary is built by our own deterministic count (ties broken by the token string);
the library trainer's tie order is not something we want the shard bytes to depend on.

Identity (`TokenizerInfo.sha256`): sha256 over every id's token string, the special ids and the
ids of a fixed probe text. It depends on what the tokenizer does, not on how it is stored, so the
slow (SentencePiece) and fast (tokenizers) loads of T0's files get the same identity, and a new
`tokenizers` serialization format does not invalidate caches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import ConfigError

EMBEDDED = "embedded"
SPECIALS = ("<pad>", "</s>", "<unk>")
# Words, digits, punctuation, accents, non-Latin script, runs of spaces and a newline.
PROBE = (
    "Premise: The cat sat on the mat.  Hypothesis: A cat is sitting? Yes, no or maybe!\n"
    "Naïve café owners paid $1,234.50 (≈ 1.2k) in 2021; 東京 — «quotes» & <tags>"
)


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    kind: str  # "hf" | "embedded"
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    sha256: str  # behavioural identity, see the module docstring

    def to_json(self) -> dict:
        return dict(self.__dict__)


def build_embedded_tokenizer(counts: Counter):
    """WordLevel tokenizer over pre-tokenised pieces counted by `count_pieces`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=1 << 30
    )


def count_pieces(texts: Iterable[str], counts: Counter) -> None:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    for t in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(t))


def load_hf_tokenizer(name_or_path: str, use_fast: bool = True):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=use_fast)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for "not found"
        raise ConfigError(f"cannot load tokenizer {name_or_path!r}: {e}") from e
    if use_fast and not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer {name_or_path!r} has no fast implementation; batched tokenisation needs one")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_path!r} has no EOS token; targets must end with EOS")
    return tok


def identity(tok) -> str:
    n = len(tok)
    body = {
        "tokens": tok.convert_ids_to_tokens(list(range(n))),
        "specials": [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id],
        "probe": tok(PROBE, add_special_tokens=False)["input_ids"],
    }
    return hashlib.sha256(json.dumps(body, ensure_ascii=False).encode("utf-8")).hexdigest()


def info(tok, name_or_path: str, kind: str) -> TokenizerInfo:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerInfo(name_or_path, kind, len(tok), int(pad), int(tok.eos_token_id), identity(tok))


def load_from_info(root: Path, kind: str, name_or_path: str):
    if kind == EMBEDDED:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(root / name_or_path))
    return load_hf_tokenizer(name_or_path)


def save_backend(tok, path: Path) -> None:
    """The tokenizer's `tokenizers` backend as one JSON file: what the worker processes load, so they
    need neither transformers nor the Hub (and start faster and smaller)."""
    if not path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        tok.backend_tokenizer.save(str(tmp))
        tmp.rename(path)


def load_backend(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


class Encoder:
    """Batched encoding into Arrow list<int32> arrays. Inputs get no EOS; targets and choices end
    with EOS (the P3 convention). Over-long sequences are cut and flagged so the manifest can
    count them. Ids are the tokenizer's own (`tok(texts, add_special_tokens=False)`); the backend
    is called directly because the Python-side BatchEncoding costs more than the cutting here."""

    def __init__(self, backend, eos_token_id: int, max_input_len: int, max_target_len: int):
        self.max_input_len, self.max_target_len = max_input_len, max_target_len
        self.eos = eos_token_id
        self._encode_batch = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

    @classmethod
    def for_tokenizer(cls, tok, max_input_len: int, max_target_len: int) -> Encoder:
        return cls(tok.backend_tokenizer, tok.eos_token_id, max_input_len, max_target_len)

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

    def _cut(self, texts: list[str], max_len: int, eos: bool) -> tuple[pa.ListArray, np.ndarray]:
        ids = self.ids(texts)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        vals = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum()))
        room = max_len - 1 if eos else max_len
        keep = np.minimum(lens, room)
        cut = lens > room
        if cut.any():
            pos = np.arange(len(vals)) - np.repeat(np.cumsum(lens) - lens, lens)
            vals = vals[pos < np.repeat(keep, lens)]
        if eos:
            out_lens = keep + 1
            out = np.full(int(out_lens.sum()), self.eos, dtype=np.int32)
            is_body = np.ones(len(out), dtype=bool)
            is_body[np.cumsum(out_lens) - 1] = False
            out[is_body] = vals
            return _list_array(out, out_lens), cut
        return _list_array(vals, keep), cut

    def train_batch(self, inputs: list[str], targets: list[str]) -> dict:
        inp, in_cut = self._cut(inputs, self.max_input_len, eos=False)
        tgt, tgt_cut = self._cut(targets, self.max_target_len, eos=True)
        return {"input_ids": inp, "target_ids": tgt, "input_truncated": in_cut, "target_truncated": tgt_cut}

    def choice_batch(self, inputs: list[str], choices: list[list[str]], labels: list[int]) -> dict:
        inp, in_cut = self._cut(inputs, self.max_input_len, eos=False)
        counts = np.fromiter(map(len, choices), dtype=np.int64, count=len(choices))
        flat, flat_cut = self._cut(list(itertools.chain.from_iterable(choices)), self.max_target_len, eos=True)
        starts = np.cumsum(counts) - counts
        choice_ids = pa.ListArray.from_arrays(pa.array(np.append(starts, counts.sum()).astype(np.int32)), flat)
        target_ids = flat.take(pa.array(starts + np.asarray(labels, dtype=np.int64)))
        row_cut = np.add.reduceat(flat_cut, starts) > 0 if len(flat_cut) else np.zeros(len(inputs), bool)
        row_cut[counts == 0] = False
        return {
            "input_ids": inp,
            "choice_ids": choice_ids,
            "target_ids": target_ids,
            "input_truncated": in_cut,
            "target_truncated": row_cut,
        }
