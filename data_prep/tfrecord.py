"""TFRecord files of tf.train.Example records, read and written without TensorFlow.

The original bigscience/P3 layout stores each config split as
`data/<config>/<split>.tfrecord-NNNNN-of-NNNNN` next to `info.<split>.json` (the seqio
cache format: `{"features": {name: {"dtype": ..., "shape": [...]}}, "num_shards": n}`).

Framing of one record: uint64 little-endian length, uint32 masked crc32c of those 8 bytes,
the payload, uint32 masked crc32c of the payload. mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8
(mod 2**32). Every CRC is verified; a mismatch or a short read names the file, the record
index and its byte offset.

The payload is a tf.train.Example protobuf:
    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }        map entry: key = 1, value = 2
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1; }  Int64List { repeated int64 value = 1; }
Fields we are not asked for are skipped without decoding (P3's token-id lists are the bulk of
every record and we re-tokenise anyway).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c

from tpds_common.errors import DataError

_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class TFRecordError(DataError):
    """A TFRecord file or an Example in it is malformed. `record` is the 0-based record index."""

    def __init__(self, path, record: int, offset: int, detail: str):
        self.path, self.record, self.offset, self.detail = str(path), record, offset, detail
        super().__init__(f"{path}: record {record} (byte offset {offset}): {detail}")

    def __reduce__(self):
        return (self.__class__, (self.path, self.record, self.offset, self.detail))


def crc32c(data: bytes) -> int:
    return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    header = _U64.pack(len(payload))
    return header + _U32.pack(masked_crc32c(header)) + payload + _U32.pack(masked_crc32c(payload))


def write_records(path, payloads) -> int:
    """Write framed records; returns how many. Used by tests and the benchmark's dump generator."""
    n = 0
    with open(path, "wb") as f:
        for p in payloads:
            f.write(frame(p))
            n += 1
    return n


class TFRecordFile:
    """Sequential access to one TFRecord file."""

    def __init__(self, path):
        self.path = Path(path)

    def _header(self, f: BinaryIO, index: int) -> int | None:
        """Length of the next record, or None at a clean end of file."""
        offset = f.tell()
        head = f.read(12)
        if not head:
            return None
        if len(head) < 12:
            raise TFRecordError(self.path, index, offset, f"truncated header ({len(head)} of 12 bytes)")
        length_bytes, crc = head[:8], _U32.unpack_from(head, 8)[0]
        if masked_crc32c(length_bytes) != crc:
            raise TFRecordError(self.path, index, offset, "length CRC mismatch (corrupt or not a TFRecord file)")
        return _U64.unpack(length_bytes)[0]

    def count(self) -> int:
        """Number of records, reading headers only (data is skipped, its CRC not checked)."""
        n = 0
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            while (length := self._header(f, n)) is not None:
                end = f.tell() + length + 4
                if end > size:
                    raise TFRecordError(
                        self.path,
                        n,
                        f.tell() - 12,
                        f"truncated record (needs {length + 4} bytes after the header, file has {size - f.tell()})",
                    )
                f.seek(end)
                n += 1
        return n

    def records(self, wanted: range | None = None) -> Iterator[tuple[int, bytes]]:
        """(index, payload) of the records whose index is in `wanted` (all if None), CRC-checked.
        Records outside `wanted` are skipped by seeking; iteration stops after wanted.stop."""
        with open(self.path, "rb") as f:
            index = 0
            while wanted is None or index < wanted.stop:
                length = self._header(f, index)
                if length is None:
                    return
                offset = f.tell() - 12
                if wanted is not None and index < wanted.start:
                    f.seek(length + 4, 1)
                    index += 1
                    continue
                payload = f.read(length)
                tail = f.read(4)
                if len(payload) < length or len(tail) < 4:
                    raise TFRecordError(self.path, index, offset, "truncated record")
                if masked_crc32c(payload) != _U32.unpack(tail)[0]:
                    raise TFRecordError(self.path, index, offset, "data CRC mismatch (corrupt record)")
                yield index, payload
                index += 1


# ---------------------------------------------------------------------------------------------
# tf.train.Example wire format
# ---------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one message: value is an int (varint, fixed32/64 as
    raw int) or a memoryview slice (length-delimited)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError(f"field {field}: length {length} runs past the end of the message")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > end:
                raise ValueError("truncated fixed32")
            value, pos = _U32.unpack_from(buf, pos)[0], pos + 4
        elif wire == 1:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            value, pos = _U64.unpack_from(buf, pos)[0], pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire} for field {field}")
        yield field, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature_values(buf: bytes) -> tuple[str, list]:
    """Decode a Feature: ("bytes"|"float"|"int64", values)."""
    kind, values = "bytes", []
    for field, _, value in _fields(buf):
        if field == 1:
            kind = "bytes"
            values = [bytes(v) for f, _, v in _fields(value) if f == 1]
        elif field == 2:
            kind, values = "float", []
            for f, wire, v in _fields(value):
                if f != 1:
                    continue
                if wire == 2:  # packed
                    values += list(struct.unpack(f"<{len(v) // 4}f", v))
                else:
                    values.append(struct.unpack("<f", _U32.pack(v))[0])
        elif field == 3:
            kind, values = "int64", []
            for f, wire, v in _fields(value):
                if f != 1:
                    continue
                if wire == 2:  # packed
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        values.append(_signed64(x))
                else:
                    values.append(_signed64(v))
    return kind, values


def parse_example(payload: bytes, wanted: set[str] | None = None) -> dict[str, tuple[str, list]]:
    """{feature name: (kind, values)} for the features in `wanted` (all if None)."""
    out = {}
    buf = memoryview(payload)
    for field, wire, features in _fields(buf):
        if field != 1 or wire != 2:
            continue
        for f, w, entry in _fields(features):
            if f != 1 or w != 2:
                continue
            name, value = None, None
            for ef, ew, ev in _fields(entry):
                if ef == 1 and ew == 2:
                    name = bytes(ev).decode("utf-8")
                elif ef == 2 and ew == 2:
                    value = ev
            if name is None or (wanted is not None and name not in wanted):
                continue
            out[name] = _feature_values(value) if value is not None else ("bytes", [])
    return out


def _len_delimited(field: int, data: bytes) -> bytes:
    return _encode_varint((field << 3) | 2) + _encode_varint(len(data)) + data


def _encode_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_example(features: dict[str, list]) -> bytes:
    """A tf.train.Example from {name: list of bytes/str | list of int | list of float}. The list
    type decides the kind (str is UTF-8 encoded); numbers are written packed, as TensorFlow does."""
    entries = b""
    for name, values in features.items():
        values = list(values)
        if values and isinstance(values[0], (bytes, str)):
            inner = b"".join(_len_delimited(1, v.encode("utf-8") if isinstance(v, str) else v) for v in values)
            feature = _len_delimited(1, inner)
        elif values and isinstance(values[0], float):
            feature = _len_delimited(2, _len_delimited(1, struct.pack(f"<{len(values)}f", *values)))
        else:  # ints, and the empty list (an empty int64_list, as TF writes for an empty sequence)
            feature = _len_delimited(3, _len_delimited(1, b"".join(_encode_varint(int(v)) for v in values)))
        entry = _len_delimited(1, name.encode("utf-8")) + _len_delimited(2, feature)
        entries += _len_delimited(1, entry)
    return _len_delimited(1, entries)


# ---------------------------------------------------------------------------------------------
# seqio feature specs (info.<split>.json)
# ---------------------------------------------------------------------------------------------


def read_feature_spec(info_path) -> dict[str, dict]:
    """`features` of a seqio info.<split>.json: {name: {"dtype": str, "shape": list}}."""
    body = json.loads(Path(info_path).read_text("utf-8"))
    features = body.get("features") if isinstance(body, dict) else None
    if not isinstance(features, dict):
        raise ValueError(f"{info_path}: no 'features' object")
    for name, spec in features.items():
        if not isinstance(spec, dict) or "dtype" not in spec:
            raise ValueError(f"{info_path}: feature {name!r} has no 'dtype'")
    return features


def decode_feature(name: str, spec: dict, kind: str, values: list):
    """Python value of one feature as the spec declares it (scalar for shape [], list otherwise).
    Raises ValueError naming the feature on a type mismatch or invalid UTF-8."""
    dtype = spec["dtype"]
    scalar = list(spec.get("shape") or []) == []
    if not values and not scalar:  # an empty list carries no type; writers pick any kind for it
        return []
    if dtype == "string":
        if kind != "bytes":
            raise ValueError(f"feature {name!r}: declared string, stored as {kind}")
        try:
            values = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as e:
            raise ValueError(f"feature {name!r}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    elif dtype in ("int32", "int64", "bool"):
        if kind != "int64":
            raise ValueError(f"feature {name!r}: declared {dtype}, stored as {kind}")
        if dtype == "bool":
            values = [bool(v) for v in values]
    elif dtype in ("float32", "float64"):
        if kind != "float":
            raise ValueError(f"feature {name!r}: declared {dtype}, stored as {kind}")
    if scalar:
        if len(values) != 1:
            raise ValueError(f"feature {name!r}: declared a scalar, has {len(values)} values")
        return values[0]
    return values


def write_info(path, features: dict[str, dict], num_shards: int = 1) -> None:
    Path(path).write_text(json.dumps({"features": features, "num_shards": num_shards}, indent=2), "utf-8")
