"""Process checks shared by the tests that stop, kill or orphan jobs."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """Running: the process exists and is not a zombie (exited, not yet reaped by the process it was handed to).
    Linux /proc; the command name in /proc/PID/stat may itself hold ") ", so the state follows the last one."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
