"""The process-wide stop request: SIGUSR1/SIGTERM/SIGINT (or the time budget) end the run after the
current step with a checkpoint and exit status 124 ("requeue me").

No heavy imports here: launchers install the handlers first thing, so a signal that Slurm sends while
the model is still loading is remembered instead of killing the process.

SIGINT is a stop request too (Ctrl-C keeps the work done so far). Launchers deliver it twice within
milliseconds (the terminal signals the whole foreground group and torchrun re-sends it to its workers),
so only a second SIGINT at least `ABORT_AFTER_S` after the first aborts at once (KeyboardInterrupt,
no checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from tpds_common.errors import EXIT_REQUEUE

REQUEUE_EXIT_CODE = EXIT_REQUEUE  # the name the engine and its callers import
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
ABORT_AFTER_S = 1.0


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._since = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Install the handlers; True if this call installed them (the caller then restores them)."""
        if self._previous:
            return False
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self.signal is not None and now - self._since >= ABORT_AFTER_S:
            raise KeyboardInterrupt  # a deliberate second Ctrl-C: abort now, without a checkpoint
        if self.signal is None:
            self.signal, self._since = signum, now

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signal = None

    @contextlib.contextmanager
    def handling(self) -> Iterator[StopFlag]:
        """Handlers installed for the block; restored after it only if this block installed them (an
        enclosing launcher's stay, with any stop request they recorded)."""
        installed = self.install()
        try:
            yield self
        finally:
            if installed:
                self.restore()


STOP = StopFlag()


def stop_when_parent_dies(parent_pid: int) -> None:
    """Turn the death of `parent_pid` (our parent, e.g. a sweep) into SIGTERM for this process, which the
    installed handler makes a stop request (checkpoint, exit 124): a sweep killed with kill -9 leaves no
    orphans training on. Linux: PR_SET_PDEATHSIG, delivered by the kernel the moment the parent dies, even
    while this process is busy in C code. Elsewhere: a daemon thread polling os.getppid() every second."""
    if os.getppid() != parent_pid:
        try:
            os.kill(parent_pid, 0)
            return  # alive but not our parent: a variable inherited from further up, not meant for us
        except ProcessLookupError:  # the parent died before we got here
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except PermissionError:
            return
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # died between the check above and prctl
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="tpds-parent-watch", daemon=True).start()
