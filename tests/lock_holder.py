"""Another live process holding a folder lock, for tests of what a second process is told."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, time
from tpds_common.locking import FolderLock
FolderLock(sys.argv[1], what=sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def held(folder, what: str = "folder"):
    """Yields the holder's Popen once it holds `folder`'s lock; kills it (kill -9) on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(folder), what],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
