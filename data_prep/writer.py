"""Output files: the staging folder swapped in atomically, streamed Arrow splits, hashes.

A later stage only trusts DIR/manifest.json, which is written last, so an interrupted run
leaves either no DIR or the previous complete DIR, never a half-written one.

Splits are written in the layout of `datasets.Dataset.save_to_disk` (data-NNNNN-of-NNNNN.arrow
Arrow IPC streams with the features in the schema metadata, state.json, dataset_info.json), so
`datasets.load_from_disk` memory-maps them; rows reach the writer as Arrow tables, a bounded
number at a time, and shard boundaries follow `Dataset.shard(contiguous=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from tpds_common.files import atomic_write_text

MANIFEST = "manifest.json"
WRITER_BATCH_ROWS = 1000


class Staging:
    """Context manager yielding a fresh staging folder in `work`; commit() swaps it in for `out`."""

    def __init__(self, out: Path, work: Path):
        self.out = out
        self.path = work / f"stage-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Staging:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(parents=True)
        return self

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.path.parent / f"old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.path, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():  # not committed: an error or an interruption
            shutil.rmtree(self.path, ignore_errors=True)


def shard_bounds(n_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard: Dataset.shard(num_shards, i, contiguous=True), at most one shard
    per row and at least one."""
    k = max(1, min(num_shards, n_rows))
    div, mod = divmod(n_rows, k)
    out, start = [], 0
    for i in range(k):
        stop = start + div + (1 if i < mod else 0)
        out.append((start, stop))
        start = stop
    return out


class SplitWriter:
    """Writes one split of `total_rows` rows into `num_shards` contiguous shards, from tables
    handed over in order. Records batches hold WRITER_BATCH_ROWS rows, counted from each shard's
    start, whatever the sizes of the incoming tables."""

    def __init__(self, root: Path, rel: str, features, total_rows: int, num_shards: int, fingerprint: str):
        from datasets.arrow_writer import ArrowWriter

        self._ArrowWriter = ArrowWriter
        self.dir = root / rel
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rel, self.features, self.fingerprint = rel, features, fingerprint
        self.schema = features.arrow_schema
        self.bounds = shard_bounds(total_rows, num_shards)
        self.names = [f"data-{i:05d}-of-{len(self.bounds):05d}.arrow" for i in range(len(self.bounds))]
        self._shard, self._row, self._pending = 0, 0, []
        self._writer = self._open(0)

    def _open(self, i: int):
        return self._ArrowWriter(features=self.features, path=str(self.dir / self.names[i]))

    def _flush(self, final: bool = False) -> None:
        rows = sum(t.num_rows for t in self._pending)
        if not rows:
            return
        table = pa.concat_tables(self._pending)
        cut = rows if final else rows - rows % WRITER_BATCH_ROWS
        for a in range(0, cut, WRITER_BATCH_ROWS):
            self._writer.write_table(table.slice(a, min(WRITER_BATCH_ROWS, cut - a)))
        self._pending = [table.slice(cut)] if cut < rows else []

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        while table.num_rows:
            stop = self.bounds[self._shard][1]
            take = min(table.num_rows, stop - self._row)
            if take == 0:  # shard full: close it, open the next
                if self._shard + 1 == len(self.bounds):
                    raise ValueError(f"{self.rel}: more rows than the {self.bounds[-1][1]} announced")
                self._flush(final=True)
                self._writer.finalize()
                self._writer.close()
                self._shard += 1
                self._writer = self._open(self._shard)
                continue
            self._pending.append(table.slice(0, take))
            self._row += take
            table = table.slice(take)
            if sum(t.num_rows for t in self._pending) >= WRITER_BATCH_ROWS:
                self._flush()

    def close(self) -> list[str]:
        self._flush(final=True)
        self._writer.finalize()
        self._writer.close()
        if self._row != self.bounds[-1][1]:
            raise ValueError(f"{self.rel}: {self._row} rows written, {self.bounds[-1][1]} announced")
        _write_dataset_meta(self.dir, self.features, self.names, self.fingerprint)
        return [f"{self.rel}/{n}" for n in self.names]


def _write_dataset_meta(folder: Path, features, names: list[str], fingerprint: str) -> None:
    """state.json and dataset_info.json as Dataset.save_to_disk writes them."""
    from datasets import DatasetInfo
    from datasets.utils.py_utils import asdict

    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), "utf-8")
    info = asdict(DatasetInfo(features=features))
    (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2), "utf-8")


def write_split(
    root: Path, rel: str, features, tables: Iterable[pa.Table], total_rows: int, num_shards: int, fingerprint: str
) -> list[str]:
    w = SplitWriter(root, rel, features, total_rows, num_shards, fingerprint)
    for t in tables:
        w.write(t)
    return w.close()


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
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
