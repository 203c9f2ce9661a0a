"""`python -m launch.torchrun [torchrun options] launch/pretrain.py [pretrain arguments]`: torchrun with
an exit status a requeueing script can use.

torchrun exits 1 whenever a worker exits non-zero, so a rank's 124 ("checkpointed, requeue me") cannot be
told from a crash. This wrapper runs `python -m torch.distributed.run` with the same arguments, gives the
workers a fresh status directory (TPDS_STATUS_DIR, see tensorpoly_ds/engine/rank_status.py) and exits
- 124 if torchrun failed and every rank it started on this node recorded "requeue";
- torchrun's own status otherwise (0 done, 1 a worker failed, ...).
SIGUSR1, SIGTERM and SIGINT sent to the wrapper are forwarded to the ranks as SIGUSR1 (a stop request:
finish the step, checkpoint, exit 124); torchrun itself forwards none of them that way (REFERENCE pitfall
11). On several nodes run one wrapper per node (`srun --ntasks-per-node=1 python -m launch.torchrun
--nnodes ... --rdzv-backend c10d ...`): each maps its own node's ranks, srun then returns 124.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from tensorpoly_ds.engine.rank_status import STATUS_DIR_ENV, read_statuses
from tpds_common.errors import EXIT_OK, EXIT_REQUEUE, EXIT_USAGE, report_user_errors
from tpds_common.log import get_logger, setup_from_args, split_logging_flags

PROG = "python -m launch.torchrun"


def exit_status(torchrun_rc: int, statuses: dict[int, dict]) -> int:
    """124 when torchrun failed only because every rank of this node stopped to be requeued."""
    if torchrun_rc == 0 or not statuses:
        return torchrun_rc
    expected = {s.get("local_world_size") for s in statuses.values()}
    complete = len(expected) == 1 and len(statuses) == expected.pop()
    if complete and all(s.get("status") == "requeue" for s in statuses.values()):
        return EXIT_REQUEUE
    return torchrun_rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return EXIT_OK if argv else EXIT_USAGE
    setup_from_args(split_logging_flags(argv)[0])  # the script's own flags (--quiet ...) also quiet the wrapper
    status_dir = tempfile.mkdtemp(prefix="tpds-status-")
    env = dict(os.environ, **{STATUS_DIR_ENV: status_dir})
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], env=env)

    requested, signalled = [], set()

    def forward_pending() -> None:
        """SIGUSR1 to every rank that has started (a rank still importing gets it once it reports)."""
        for body in read_statuses(status_dir).values():
            pid = body.get("pid")
            if body.get("status") == "running" and pid not in signalled:
                signalled.add(pid)
                try:
                    os.kill(int(pid), signal.SIGUSR1)
                except (ProcessLookupError, PermissionError, TypeError, ValueError):
                    pass

    def on_signal(signum, frame):
        requested.append(signum)
        forward_pending()

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        while proc.poll() is None:
            if requested:
                forward_pending()
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        rc = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        statuses = read_statuses(status_dir)
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
    code = exit_status(rc, statuses)
    if code != rc:
        get_logger("tensorpoly-ds").info(
            f"torchrun exited {rc}; every rank checkpointed and asks to be requeued: exit {code}"
        )
    return code


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
