"""Atomic output: everything is built in a staging folder next to DIR and renamed into place.

A later stage only trusts DIR/manifest.json, which is written last, so an interrupted run
leaves either no DIR or the previous complete DIR, never a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import datasets

MANIFEST = "manifest.json"


class Staging:
    """Context manager yielding a fresh staging folder; commit() swaps it in for `out`."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "Staging":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.path, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():   # not committed: an error or an interruption
            shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def _quiet_datasets_progress():
    """Flattening and saving a few thousand rows is instant; their bars would bury the real progress."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def save_split(ds, root: Path, rel: str, num_shards: int) -> list[str]:
    """save_to_disk with at most one shard per row; returns the shard files relative to root."""
    target = root / rel
    shards = max(1, min(num_shards, len(ds)))
    # Rewrite into fixed-size record batches: the chunk layout otherwise depends on num_proc
    # (and selections leave an indices mapping), and it shows up in the shard bytes.
    with _quiet_datasets_progress():
        ds = ds.flatten_indices(keep_in_memory=True, writer_batch_size=1000,
                                new_fingerprint=hashlib.sha256(f"{ds._fingerprint}|flat".encode()).hexdigest()[:32])
        ds.save_to_disk(str(target), num_shards=shards)
    return sorted(f"{rel}/{p.name}" for p in target.glob("*.arrow"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(root: Path, manifest_body: dict) -> str:
    """sha256 over every file's bytes (path-sorted, manifest excluded) plus the manifest body."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name != MANIFEST):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + file_sha256(p).encode() + b"\n")
    body = {k: v for k, v in manifest_body.items() if k != "content_hash"}
    h.update(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
