"""Atomic writes: a reader (or a crash) never sees a half-written file. Each writer writes a temp file in the
target's folder (same file system, so the rename is atomic), fsyncs it, then renames it over the target."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def temp_path(path: Path) -> Path:
    """A hidden sibling unique to this process (two processes never share a temp file)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_output(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yields a temp path for a writer that wants a file name (safetensors, Arrow, matplotlib); on success
    the file replaces `path`, on error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, default: Callable[[Any], Any] | None = None,
                      indent: int | None = 2, sort_keys: bool = True, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n",
                      fsync=fsync)


def read_text(path: str | os.PathLike, error: type[Exception], what: str = "file") -> str:
    """The file's text; a missing or unreadable file raises `error` (a UserError class) naming it, so the
    entry point reports one line instead of an OSError traceback."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read the {what} ({getattr(err, 'strerror', None) or err})") from None
