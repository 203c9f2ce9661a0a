"""Reading a prepared data directory: the API every later stage uses (see docs/design.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from tpds_common.errors import DataError

from .writer import MANIFEST

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 adds `sources` and `skipped.empty`; splits are read the same way


class ManifestError(DataError):
    """DIR/manifest.json is missing, unreadable or not in the expected format."""


@dataclass
class Manifest:
    format_version: int
    tasks: list[str]
    held_out: list[str]
    tokenizer: dict
    max_input_len: int
    max_target_len: int
    mixture: str
    source: str
    rule: dict
    counts: dict
    truncated: dict
    skipped: dict
    shards: dict
    content_hash: str
    args: dict
    few_shot: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def task_id(self, name: str) -> int:
        return self.tasks.index(name)

    def to_json(self) -> dict:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        body.update(self.extra)
        return body


_TYPES = {
    "format_version": int,
    "tasks": list,
    "held_out": list,
    "tokenizer": dict,
    "max_input_len": int,
    "max_target_len": int,
    "mixture": str,
    "source": str,
    "rule": dict,
    "counts": dict,
    "truncated": dict,
    "skipped": dict,
    "shards": dict,
    "content_hash": str,
    "args": dict,
}


def manifest_from_json(body: dict, path: str = MANIFEST) -> Manifest:
    if not isinstance(body, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    if body.get("format_version") not in READABLE_VERSIONS:
        raise ManifestError(
            f"{path}: field 'format_version' is {body.get('format_version')!r}, "
            f"this code reads format_version {' or '.join(map(str, READABLE_VERSIONS))}"
        )
    for name, typ in _TYPES.items():
        if name not in body:
            raise ManifestError(f"{path}: missing field {name!r}")
        if not isinstance(body[name], typ):
            raise ManifestError(f"{path}: field {name!r} should be {typ.__name__}, got {type(body[name]).__name__}")
    for name in ("name_or_path", "kind", "vocab_size", "pad_token_id", "eos_token_id"):
        if name not in body["tokenizer"]:
            raise ManifestError(f"{path}: missing field 'tokenizer.{name}'")
    known = {f.name for f in fields(Manifest)}
    kwargs = {k: v for k, v in body.items() if k in known}
    return Manifest(**kwargs, extra={k: v for k, v in body.items() if k not in known})


def read_manifest(directory) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: not found (is {directory} a complete prepared data directory?)")
    try:
        body = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: invalid JSON ({e})") from None
    return manifest_from_json(body, str(path))


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous share of rank: the shares are disjoint and cover range(n)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def load_split(directory, split: str, rank: int = 0, world_size: int = 1):
    """Memory-mapped datasets.Dataset of `split` ("train", "val", "eval/<task>",
    "few_shot/<task>/<k>_shot/<seed>_seed"); this rank's contiguous share."""
    import datasets

    m = read_manifest(directory)
    if split not in m.shards:
        raise KeyError(f"unknown split {split!r}; valid splits: {', '.join(m.shards)}")
    ds = datasets.load_from_disk(str(Path(directory) / split))
    r = shard_range(len(ds), rank, world_size)
    return ds.select(r) if (r.start, r.stop) != (0, len(ds)) else ds


def load_tokenizer(directory):
    from .tokenizer import load_from_info

    m = read_manifest(directory)
    return load_from_info(Path(directory), m.tokenizer["kind"], m.tokenizer["name_or_path"])
