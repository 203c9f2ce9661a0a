"""One prep at a time per output folder: an exclusive kernel lock (flock) on a lock file.

The kernel drops the lock when its holder exits, however it exits (kill -9 included), so there
is no stale-lock cleanup. The holder writes who it is into the file; a second prep prints that
and waits, or refuses at once with --no-wait. Either way the two never write DIR together: the
second one starts only after the first has finished and then sees its manifest (same arguments:
nothing to do; other arguments: refused unless --overwrite).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import ConfigError


class OutputLock:
    def __init__(self, path: Path, out: Path):
        self.path, self.out = path, out
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text("utf-8") or "{}")
        except (OSError, ValueError):
            h = {}
        if not h:
            return "another process (no holder information yet)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
        return f"pid {h.get('pid')} on {h.get('host')} since {started} ({' '.join(h.get('argv', []))[:200]})"

    def acquire(self, wait: bool, log) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = self.holder()
            if not wait:
                os.close(fd)
                raise ConfigError(f"{self.out} is being prepared by {who}; not waiting (--no-wait). "
                                  f"Lock file: {self.path}") from None
            log(f"{self.out} is being prepared by {who}; waiting for it to finish (--no-wait refuses instead)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()
