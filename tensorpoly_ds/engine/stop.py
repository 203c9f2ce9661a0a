"""The process-wide stop request: SIGUSR1/SIGTERM (or the time budget) end the run after the current
step with a checkpoint and exit status 124 ("requeue me").

No heavy imports here: launchers install the handlers first thing, so a signal that Slurm sends while
the model is still loading is remembered instead of killing the process.
"""

from __future__ import annotations

import signal
from typing import Any

REQUEUE_EXIT_CODE = 124


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Install the handlers; True if this call installed them (the caller then restores them)."""
        if self._previous:
            return False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: leave signals to the caller
                pass
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signal = None


STOP = StopFlag()
