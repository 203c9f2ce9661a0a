"""Fingerprints of source files, so that a changed input is noticed on a rerun.

A fingerprint is {file, size, mtime_ns, sha256, hashed}: `hashed` is "bytes" (sha256 of the whole
file) or "parquet-footer" (sha256 of the size and the footer metadata, for Parquet files over
HASH_ALL_BELOW bytes: the footer holds every row group's offsets, sizes and statistics, so any
rewrite changes it, and reading it costs one seek instead of the whole file).
Size and mtime are a shortcut, as in make and git: when both match a previous fingerprint its
digest is reused without reading the file; when either differs the file is hashed again, and
only a different digest counts as a change (a `touch` alone does not).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .writer import file_sha256

HASH_ALL_BELOW = 64 << 20
_PARQUET_MAGIC = b"PAR1"


def _parquet_footer_sha256(path: Path, size: int) -> str | None:
    with path.open("rb") as f:
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] != _PARQUET_MAGIC:
            return None
        meta_len = int.from_bytes(tail[:4], "little")
        if meta_len + 8 > size:
            return None
        f.seek(size - 8 - meta_len)
        footer = f.read(meta_len + 8)
    return hashlib.sha256(str(size).encode() + b"\0" + footer).hexdigest()


def file_fingerprint(path, previous: dict | None = None) -> dict:
    path = Path(path)
    st = path.stat()
    fp = {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if previous and all(previous.get(k) == fp[k] for k in ("file", "size", "mtime_ns")) and previous.get("sha256"):
        return {**fp, "sha256": previous["sha256"], "hashed": previous.get("hashed", "bytes")}
    digest = None
    if path.suffix == ".parquet" and st.st_size > HASH_ALL_BELOW:
        digest = _parquet_footer_sha256(path, st.st_size)
        if digest is not None:
            return {**fp, "sha256": digest, "hashed": "parquet-footer"}
    return {**fp, "sha256": file_sha256(path), "hashed": "bytes"}


def stat_unchanged(recorded: dict) -> bool:
    """True when a recorded local file still has its size and mtime (no hashing)."""
    if "size" not in recorded:  # content-addressed (hub revision, generated data): never stale by stat
        return True
    try:
        st = Path(recorded["file"]).stat()
    except OSError:
        return False
    return st.st_size == recorded["size"] and st.st_mtime_ns == recorded["mtime_ns"]


def same_content(a: list[dict], b: list[dict]) -> bool:
    key = lambda fps: [(f["file"], f.get("sha256")) for f in fps]
    return key(a) == key(b)
