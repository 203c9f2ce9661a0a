"""Tokenizers: a Hugging Face fast tokenizer by name/path, or the offline `embedded` one.

The embedded tokenizer is a WordLevel model over the prepared text, with T5's special-token
layout (pad=0 "<pad>", eos=1 "</s>", unk=2 "<unk>") so downstream code needs no special cases.
Its vocabulary is built by our own deterministic count (ties broken by the token string);
the library trainer's tie order is not something we want the shard bytes to depend on.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

EMBEDDED = "embedded"
SPECIALS = ("<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    kind: str            # "hf" | "embedded"
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    sha256: str          # of the serialized backend tokenizer: identity independent of the name

    def to_json(self) -> dict:
        return dict(self.__dict__)


def build_embedded_tokenizer(texts: Iterable[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    counts: Counter = Counter()
    for t in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(t))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=1 << 30)


def load_hf_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for "not found"
        raise ConfigError(f"cannot load tokenizer {name_or_path!r}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer {name_or_path!r} has no fast implementation; batched tokenisation needs one")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_path!r} has no EOS token; targets must end with EOS")
    return tok


def info(tok, name_or_path: str, kind: str) -> TokenizerInfo:
    digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerInfo(name_or_path, kind, len(tok), int(pad), int(tok.eos_token_id), digest)


def load_from_info(root: Path, kind: str, name_or_path: str):
    if kind == EMBEDDED:
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(str(root / name_or_path))
    return load_hf_tokenizer(name_or_path)


@dataclass
class Encoder:
    """Batched encoding for datasets.map. Inputs get no EOS; targets and choices end with EOS
    (the P3 convention). Over-long sequences are cut and flagged so the manifest can count them."""
    tokenizer: object
    max_input_len: int
    max_target_len: int

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _with_eos(self, ids: list[int]) -> tuple[list[int], bool]:
        eos = self.tokenizer.eos_token_id
        if len(ids) + 1 > self.max_target_len:
            return ids[: self.max_target_len - 1] + [eos], True
        return ids + [eos], False

    def _inputs(self, texts: list[str]):
        ids = self._encode(texts)
        return [x[: self.max_input_len] for x in ids], [len(x) > self.max_input_len for x in ids]

    def train_batch(self, batch: dict) -> dict:
        inp, in_cut = self._inputs(batch["input_text"])
        tgt = [self._with_eos(x) for x in self._encode(batch["target_text"])]
        return {"input_ids": inp, "target_ids": [t[0] for t in tgt],
                "input_truncated": in_cut, "target_truncated": [t[1] for t in tgt]}

    def choice_batch(self, batch: dict) -> dict:
        inp, in_cut = self._inputs(batch["input_text"])
        flat = [c for cs in batch["choices"] for c in cs]
        enc = [self._with_eos(x) for x in self._encode(flat)] if flat else []
        choice_ids, cut, pos = [], [], 0
        for cs in batch["choices"]:
            part = enc[pos: pos + len(cs)]
            pos += len(cs)
            choice_ids.append([p[0] for p in part])
            cut.append(any(p[1] for p in part))
        target_ids = [cs[label] for cs, label in zip(choice_ids, batch["label"])]
        return {"input_ids": inp, "choice_ids": choice_ids, "target_ids": target_ids,
                "input_truncated": in_cut, "target_truncated": cut}
