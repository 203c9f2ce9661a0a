"""Streaming readers: one config split, stored as one or more files of one format, read in
bounded chunks of rows.

A reader knows how many rows the split has (cheaply where the format allows: Parquet footers,
TFRecord headers) and yields `Chunk`s for a range of rows, reading only the columns we use.
Every failure to read is a ReadError naming the file, the config and the row/line/record, so
a bad dump never ends in a bare pyarrow or codec traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import tfrecord
from .errors import DataError, ReadError
from .records import CHOICES, INPUT, MISSING, TARGET, Chunk

COLUMNS = (INPUT, TARGET, CHOICES)
DATA_KINDS_BY_EXT = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".arrow": "arrow"}
CHUNK_ROWS = 4096


@dataclass(frozen=True)
class SplitFiles:
    """Where one config split lives. `files` are local paths, or (hub) repository paths / data-file
    URLs that the source turns into local files when the split is opened."""

    config: str
    split: str
    kind: str  # parquet | jsonl | arrow | tfrecord | hub-parquet | embedded
    files: tuple[str, ...]
    info: str | None = None  # TFRecord: the seqio info.<split>.json with the feature spec

    def describe(self) -> str:
        shown = ", ".join(self.files[:3]) + (f", ... ({len(self.files)} files)" if len(self.files) > 3 else "")
        return f"{self.kind}: {shown}"


class FileFormat:
    """Per-format access to one file: row count and chunks of [start, stop)."""

    def rows(self, path: Path, config: str) -> int:
        raise NotImplementedError

    def chunks(self, path: Path, config: str, start: int, stop: int) -> Iterator[Chunk]:
        raise NotImplementedError


def _columns(table_or_batch, names) -> dict[str, list]:
    return {n: table_or_batch.column(n).to_pylist() for n in COLUMNS if n in names}


class ParquetFormat(FileFormat):
    def _open(self, path: Path, config: str) -> pq.ParquetFile:
        if path.stat().st_size == 0:
            raise ReadError(str(path), config, "file", "empty file (0 bytes), not a Parquet file")
        try:
            return pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ReadError(str(path), config, "file", f"not a readable Parquet file ({e})") from None

    def rows(self, path, config):
        return self._open(path, config).metadata.num_rows

    def chunks(self, path, config, start, stop):
        pf = self._open(path, config)
        names = [n for n in COLUMNS if n in pf.schema_arrow.names]
        groups, first, row = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > start and row < stop:
                groups.append(g)
                first = row if first is None else first
            row += n
        if not groups:
            return
        row = first
        try:
            for batch in pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=groups, columns=names):
                lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
                if lo < hi:
                    part = batch.slice(lo, hi - lo)
                    yield Chunk(str(path), _columns(part, names), part.num_rows, first=row + lo)
                row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ReadError(str(path), config, f"rows from {row}", f"corrupt or truncated Parquet data ({e})") from None


class ArrowFormat(FileFormat):
    """Arrow IPC stream (what `datasets` writes) or IPC file."""

    def _batches(self, path: Path, config: str) -> Iterator[pa.RecordBatch]:
        if path.stat().st_size == 0:
            raise ReadError(str(path), config, "file", "empty file (0 bytes), not an Arrow IPC file")
        rows = 0
        with pa.OSFile(str(path), "rb") as f:
            try:
                reader = pa.ipc.open_stream(f)
            except (pa.ArrowException, OSError):  # not a stream: maybe the IPC file format
                reader = None
            if reader is not None:
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        return
                    except (pa.ArrowException, OSError) as e:
                        raise ReadError(
                            str(path), config, f"rows from {rows}", f"corrupt or truncated Arrow stream ({e})"
                        ) from None
                    rows += batch.num_rows
                    yield batch
        with pa.OSFile(str(path), "rb") as f:
            try:
                reader = pa.ipc.open_file(f)
            except (pa.ArrowException, OSError) as e:
                raise ReadError(str(path), config, "file", f"not an Arrow IPC stream or file ({e})") from None
            for i in range(reader.num_record_batches):
                try:
                    batch = reader.get_batch(i)
                except (pa.ArrowException, OSError) as e:
                    raise ReadError(str(path), config, f"rows from {rows}", f"corrupt Arrow file ({e})") from None
                rows += batch.num_rows
                yield batch

    def rows(self, path, config):
        return sum(b.num_rows for b in self._batches(path, config))

    def chunks(self, path, config, start, stop):
        row = 0
        for batch in self._batches(path, config):
            if row >= stop:
                return
            lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
            for a in range(lo, hi, CHUNK_ROWS):
                part = batch.slice(a, min(CHUNK_ROWS, hi - a))
                yield Chunk(str(path), _columns(part, batch.schema.names), part.num_rows, first=row + a)
            row += batch.num_rows


class JsonLinesFormat(FileFormat):
    """One JSON object per non-blank line; row = index among non-blank lines."""

    def _lines(self, path: Path, config: str) -> Iterator[tuple[int, int, bytes]]:
        """(row, 1-based line number, raw line) of the non-blank lines."""
        row = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield row, lineno, raw
                    row += 1

    def rows(self, path, config):
        return sum(1 for _ in self._lines(path, config))

    def chunks(self, path, config, start, stop):
        cols: dict[str, list] = {n: [] for n in COLUMNS}
        first = None
        for row, lineno, raw in self._lines(path, config):
            if row < start:
                continue
            if row >= stop:
                break
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ReadError(
                    str(path),
                    config,
                    f"row {row}, line {lineno}",
                    f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                ) from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    "malformed_json", str(path), config, row, "<line>", f"invalid JSON on line {lineno} ({e.msg})"
                ) from None
            if not isinstance(rec, dict):
                raise DataError(
                    "wrong_type",
                    str(path),
                    config,
                    row,
                    "<record>",
                    f"expected a JSON object on line {lineno}, got {type(rec).__name__}",
                )
            first = row if first is None else first
            for n in COLUMNS:
                cols[n].append(rec.get(n, MISSING))
            if len(cols[INPUT]) == CHUNK_ROWS:
                yield Chunk(str(path), cols, CHUNK_ROWS, first=first)
                cols, first = {n: [] for n in COLUMNS}, None
        if cols[INPUT]:
            yield Chunk(str(path), cols, len(cols[INPUT]), first=first)


class TFRecordFormat(FileFormat):
    def __init__(self, info: Path):
        self.info = info
        self._spec = None

    def spec(self, config: str) -> dict:
        if self._spec is None:
            try:
                self._spec = tfrecord.read_feature_spec(self.info)
            except (OSError, ValueError) as e:
                raise ReadError(str(self.info), config, "file", f"unusable feature spec ({e})") from None
        return self._spec

    def rows(self, path, config):
        try:
            return tfrecord.TFRecordFile(path).count()
        except tfrecord.TFRecordError as e:
            raise ReadError(str(path), config, f"record {e.record}", e.detail) from None

    def chunks(self, path, config, start, stop):
        spec = self.spec(config)
        wanted = {n for n in COLUMNS if n in spec}
        cols: dict[str, list] = {n: [] for n in COLUMNS}
        first = None
        try:
            for index, payload in tfrecord.TFRecordFile(path).records(range(start, stop)):
                try:
                    feats = tfrecord.parse_example(payload, wanted)
                    values = {
                        n: tfrecord.decode_feature(n, spec[n], *feats[n]) if n in feats else MISSING for n in COLUMNS
                    }
                except ValueError as e:
                    raise ReadError(str(path), config, f"record {index}", f"malformed tf.train.Example ({e})") from None
                first = index if first is None else first
                for n in COLUMNS:
                    cols[n].append(values[n])
                if len(cols[INPUT]) == CHUNK_ROWS:
                    yield Chunk(str(path), cols, CHUNK_ROWS, first=first)
                    cols, first = {n: [] for n in COLUMNS}, None
        except tfrecord.TFRecordError as e:
            raise ReadError(str(path), config, f"record {e.record}", e.detail) from None
        if cols[INPUT]:
            yield Chunk(str(path), cols, len(cols[INPUT]), first=first)


FORMATS: dict[str, Callable[[SplitFiles], FileFormat]] = {
    "parquet": lambda sf: ParquetFormat(),
    "arrow": lambda sf: ArrowFormat(),
    "jsonl": lambda sf: JsonLinesFormat(),
    "tfrecord": lambda sf: TFRecordFormat(Path(sf.info)),
}


class SplitReader:
    """All files of one config split, in order; row indices are global within the split."""

    def __init__(self, config: str, fmt: FileFormat, files: list[Path]):
        self.config, self.fmt, self.files = config, fmt, files
        self._sizes: list[int] | None = None

    def file_rows(self) -> list[int]:
        if self._sizes is None:
            self._sizes = [self.fmt.rows(p, self.config) for p in self.files]
        return self._sizes

    def num_rows(self) -> int:
        return sum(self.file_rows())

    def chunks(self, rows: range) -> Iterator[Chunk]:
        """Chunks covering exactly the global rows in `rows` (step 1), in order."""
        offset = 0
        for path, n in zip(self.files, self.file_rows()):
            lo, hi = max(rows.start - offset, 0), min(rows.stop - offset, n)
            if lo < hi:
                for c in self.fmt.chunks(path, self.config, lo, hi):
                    c.offset = offset + c.first
                    yield c
            offset += n
            if offset >= rows.stop:
                return


class RowsReader:
    """A split already in memory as a list of records (the embedded generator)."""

    def __init__(self, config: str, origin: str, rows: list):
        self.config, self.origin, self.rows = config, origin, rows

    def file_rows(self) -> list[int]:
        return [len(self.rows)]

    def num_rows(self) -> int:
        return len(self.rows)

    def chunks(self, rows: range):
        for a in range(rows.start, min(rows.stop, len(self.rows)), CHUNK_ROWS):
            part = self.rows[a : min(a + CHUNK_ROWS, rows.stop)]
            for i, r in enumerate(part):
                if not isinstance(r, dict):
                    raise DataError(
                        "wrong_type",
                        self.origin,
                        self.config,
                        a + i,
                        "<record>",
                        f"expected an object, got {type(r).__name__}",
                    )
            cols = {n: [r.get(n, MISSING) for r in part] for n in COLUMNS}
            c = Chunk(self.origin, cols, len(part), first=a)
            c.offset = a
            yield c


def open_files(sf: SplitFiles, files: list[Path]) -> SplitReader:
    return SplitReader(sf.config, FORMATS[sf.kind](sf), files)
