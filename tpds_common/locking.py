"""Folder locks: one live process at a time works in a folder (a job's output, a sweep's directory).

    with FolderLock(out_dir, what="adaptation job"):   # raises LockHeld naming the holder
        ...

The lock is a kernel lock (flock) on FOLDER/.tpds.lock: the kernel releases it when the holder exits,
however it exits (kill -9 and node-local crashes included), so a lock can never be left stale by a dead
process. Beside it, FOLDER/.tpds.lock.json names the holder (pid, host, start time, command) for the
message a second process gets; after a crash that file may remain, but it is only read while the lock
is actually held and is rewritten by the next holder.

The lock file descriptor is not inherited by subprocesses (Python opens files close-on-exec), but a
process forked without exec (a DataLoader worker) shares it, so the lock lasts as long as any of them.

NFS: Linux emulates flock on NFS with POSIX byte-range locks held by the NFS server, so they are
cluster-wide on NFSv4 (and NFSv3 with lockd); they are lost if the server's lock state is lost (server
reboot without grace period) or the client is partitioned for longer than the lease. Lustre mounted
with `localflock` and some other parallel file systems give node-local locks only: two nodes then both
get the lock. Where the file system refuses locks (ENOLCK, EOPNOTSUPP), the work proceeds with a
warning that concurrent runs are not detected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import BusyError
from .files import atomic_write_json

LOCK_NAME = ".tpds.lock"
HOLDER_NAME = ".tpds.lock.json"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockHeld(BusyError):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: Path, what: str, holder: dict | None):
        self.folder, self.what, self.holder = folder, what, holder or {}
        super().__init__(
            f"{what} {folder} is in use by {describe(self.holder)}; wait for it to finish or "
            "stop it (the lock is released when that process exits)"
        )


def describe(holder: dict) -> str:
    if not holder:
        return "another process (holder unknown)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    cmd = " ".join(holder.get("argv") or [])
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}" + (
        f" ({cmd[:200]})" if cmd else ""
    )


def read_holder(folder: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(folder) / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return {}


class FolderLock:
    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None
        self.supported = True

    def acquire(self, wait_s: float | None = 0.5, on_wait: Callable[[str], None] | None = None) -> FolderLock:
        """Raises LockHeld if a live process still holds the lock after `wait_s` seconds (the short wait
        covers another process's momentary probe, see holder_if_locked). `wait_s=None` waits for as long as the
        holder lives, telling `on_wait` once who it is waiting for."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    if deadline is None:
                        if on_wait is not None:
                            on_wait(f"{self.what} {self.folder} is in use by {describe(read_holder(self.folder))}")
                        fcntl.flock(fd, fcntl.LOCK_EX)
                        break
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    os.close(fd)
                    raise LockHeld(self.folder, self.what, read_holder(self.folder)) from None
                if err.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                warnings.warn(
                    f"{self.folder}: the file system refuses file locks ({os.strerror(err.errno)}); "
                    "a concurrent run in this folder will not be detected",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.supported = False
                break
        self._fd = fd
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "argv": sys.argv,
            "what": self.what,
        }
        # informative only (read for the message a second process gets): no fsync
        atomic_write_json(self.folder / HOLDER_NAME, holder, indent=1, sort_keys=False, fsync=False)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # the holder file goes first, while the lock still excludes the next holder's write
        (self.folder / HOLDER_NAME).unlink(missing_ok=True)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_if_locked(folder: str | os.PathLike) -> dict | None:
    """The holder's description if a live process holds the folder's lock, else None (does not keep it)."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return read_holder(folder) or {"pid": "?"}
        return None
    finally:
        os.close(fd)
    return None
