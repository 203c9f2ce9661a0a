"""Atomic writes: a reader (or a crash) never sees a half-written file. Each writer writes a temp file in the
target's folder (same file system, so the rename is atomic), fsyncs it, then renames it over the target."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path(path: Path) -> Path:
    """A hidden sibling unique to this process (two processes never share a temp file); it keeps the suffix,
    from which some writers (matplotlib) infer the format."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


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
    with atomic_output(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def json_default(obj: Any) -> Any:
    """Paths as strings, numpy scalars as Python numbers (duck-typed: no numpy import down here)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    default: Callable[[Any], Any] | None = json_default,
    indent: int | None = 2,
    sort_keys: bool = True,
    fsync: bool = True,
) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n", fsync=fsync)


def atomic_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder with `write(tmp)`, then swap it in: a reader never sees a half-written
    folder (the old one, if any, is removed just before the rename)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_text(path: str | os.PathLike, error: type[Exception], what: str = "file") -> str:
    """The file's text; a missing or unreadable file raises `error` (a UserError class) naming it, so the
    entry point reports one line instead of an OSError traceback."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read the {what} ({getattr(err, 'strerror', None) or err})") from None
