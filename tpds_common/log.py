"""The project logger: one root ("tpds"), rank-aware, configured once by each entry point.

Library code only gets a logger and logs; it never configures logging and never prints:

    from tpds_common.log import get_logger
    log = get_logger("replicate")              # lines read "[replicate] ..."
    log.info(f"backbone {root}: cached")       # progress and what was done
    log.warning(f"{label}: skipped ({why})")   # something the user should look at
    log.debug("...")                           # detail, shown with --verbose

An entry point parses the shared flags and calls `setup_logging` once:

    p = argparse.ArgumentParser(...); add_logging_arguments(p)
    args = p.parse_args(argv); setup_from_args(args)

Levels: `--quiet` WARNING, default INFO, `--verbose` DEBUG. On a multi-rank run rank 0 logs at that level and the
other ranks only WARNING and above, unless `--log-all-ranks` (or TPDS_LOG_ALL_RANKS=1). When the world has
more than one rank every line starts with `[rank R] `; the component follows in brackets as before
(`[rank 1] [tensorpoly-ds] resumed from ...`).

Stream: log lines go to **stderr**, on purpose. stdout carries a command's result only, printed with print()
and never through logging (the `params`/`plan` tables and `--json`, `adapt`'s result line and `--print-job`,
`sweep`'s job-table line, `lr-search`'s choice, the demo's table, an export's path), so `... --json | jq` and
scripts that parse a result never meet a log line, whatever the verbosity. tqdm bars and Python warnings already
write to stderr, so bars and log lines interleave in one stream. Job logs (a sweep row's or a replicate job's
log.txt, Slurm's `--output` files) capture both streams, so nothing is lost there; a script that read a
progress line from stdout must read stderr now (the project's own tests do).

Progress bars: `progress(...)` is tqdm with the project's policy: off on every rank but 0; on rank 0 on when
stderr is a terminal, or when asked (`--progress`, TPDS_PROGRESS=1); TPDS_PROGRESS=0 turns them off.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

ROOT = "tpds"
QUIET, DEFAULT, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG

_progress_requested: bool | None = None  # --progress of this process's entry point (None: not given)
_current_setup: dict = {}  # setup_logging's arguments, for a process the entry point spawns


def get_logger(component: str | None = None) -> logging.Logger:
    """The logger of one component; its lines read `[component] message` (`tpds` itself has no prefix)."""
    return logging.getLogger(f"{ROOT}.{component}" if component else ROOT)


def _env_int(names: tuple[str, ...], default: int) -> int:
    for var in names:
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return default


def env_rank() -> int:
    """This process's rank as the launchers export it (torchrun/deepspeed RANK, srun SLURM_PROCID); 0 alone."""
    return _env_int(("RANK", "SLURM_PROCID"), 0)


def env_world() -> int:
    return _env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1)


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


class _Formatter(logging.Formatter):
    def __init__(self, rank_prefix: str = "") -> None:
        super().__init__()
        self.rank_prefix = rank_prefix

    def format(self, record: logging.LogRecord) -> str:
        component = record.name[len(ROOT) + 1 :] if record.name.startswith(ROOT + ".") else ""
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return self.rank_prefix + (f"[{component}] " if component else "") + text


class _Handler(logging.StreamHandler):
    """Writes to the given stream, or to whatever sys.stderr is at the time of the call (so pytest's capsys
    and a redirected sys.stderr see the lines)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._fixed = stream

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm_module = sys.modules.get("tqdm")
        if tqdm_module is None or not tqdm_module.tqdm._instances:  # no live bar: nothing to clear
            return super().emit(record)
        # a live bar on the same stream is cleared, the line written, the bar redrawn below it
        with tqdm_module.tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def setup_logging(
    level: int = DEFAULT,
    rank: int | None = None,
    all_ranks: bool | None = None,
    stream: TextIO | None = None,
    progress: bool | None = None,
    world: int | None = None,
) -> None:
    """Configures the "tpds" logger for this process; calling it again replaces the previous setup (never
    adds a second handler). Entry points only. `stream` None means stderr (see the module docstring)."""
    global _progress_requested, _current_setup
    rank = env_rank() if rank is None else rank
    world = env_world() if world is None else world
    all_ranks = bool(_env_flag("TPDS_LOG_ALL_RANKS")) if all_ranks is None else all_ranks
    if rank != 0 and not all_ranks:
        level = max(level, logging.WARNING)
    root = logging.getLogger(ROOT)
    for old in [h for h in root.handlers if getattr(h, "_tpds_setup", False)]:
        root.removeHandler(old)
    handler = _Handler(stream)
    handler._tpds_setup = True
    handler.setLevel(level)
    handler.setFormatter(_Formatter(f"[rank {rank}] " if world > 1 else ""))
    root.addHandler(handler)
    root.setLevel(level)
    # our handler prints every tpds line; a root handler some library installs must not print it twice
    root.propagate = False
    _progress_requested = progress
    _current_setup = dict(level=level, rank=rank, all_ranks=all_ranks, progress=progress, world=world)


def inherited_setup() -> dict:
    """This process's setup_logging arguments ({} if it never ran), for a process it spawns (multiprocessing
    starts it unconfigured) to log the same way: `setup_logging(**inherited_setup())` there."""
    return dict(_current_setup)


@contextlib.contextmanager
def capture(write: Callable[[str], None], level: int = logging.INFO) -> Iterator[None]:
    """While active, every tpds message at `level` or above also goes to `write` (one formatted line per
    call, no rank prefix). For a worker that keeps each job's messages in the job's own log file, and for
    tests; the entry point's handler keeps its own level."""

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            write(self.format(record))

    root = logging.getLogger(ROOT)
    handler = _Collect(level)
    handler.setFormatter(_Formatter())
    previous = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > level:
        root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def progress_enabled(rank: int | None = None) -> bool:
    if (env_rank() if rank is None else rank) != 0:
        return False
    if _progress_requested:
        return True
    from_env = _env_flag("TPDS_PROGRESS")
    if from_env is not None:
        return from_env
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable=None, *, rank: int | None = None, **kwargs):
    """tqdm(iterable, **kwargs) under the project's policy (module docstring); an explicit disable=True wins."""
    from tqdm import tqdm

    kwargs["disable"] = bool(kwargs.get("disable")) or not progress_enabled(rank)
    return tqdm(iterable, **kwargs)


# ---- the shared command-line flags ----

LOGGING_FLAGS = ("--quiet", "--verbose", "--log-all-ranks", "--progress")
LOGGING_DESTS = ("log_level", "log_all_ranks", "progress")  # the Namespace fields they set (not a config's)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """--quiet/--verbose/--log-all-ranks/--progress, the same on every entry point."""
    group = parser.add_argument_group("output")
    levels = group.add_mutually_exclusive_group()
    levels.add_argument(
        "--quiet",
        dest="log_level",
        action="store_const",
        const=QUIET,
        default=DEFAULT,
        help="only warnings and errors (a command's result is still printed)",
    )
    levels.add_argument("--verbose", dest="log_level", action="store_const", const=VERBOSE, help="also debug detail")
    group.add_argument(
        "--log-all-ranks",
        action="store_true",
        default=None,
        help="every rank logs at the chosen level (default: rank 0; others warnings only; also TPDS_LOG_ALL_RANKS=1)",
    )
    group.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="progress bars even when stderr is not a terminal (also TPDS_PROGRESS=1)",
    )


def setup_from_args(args: argparse.Namespace) -> None:
    setup_logging(args.log_level, all_ranks=args.log_all_ranks, progress=args.progress)


def split_logging_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The logging flags anywhere in `argv` and the other arguments, for a wrapper that passes its arguments
    on (the dispatcher, the torchrun wrapper) rather than parsing them all."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # torchrun's --pro... is not ours
    add_logging_arguments(parser)
    return parser.parse_known_args(argv)


def logging_argv(args: argparse.Namespace) -> list[str]:
    """The flags that reproduce `args`' logging choices, for an entry point that runs another one."""
    argv = {QUIET: ["--quiet"], VERBOSE: ["--verbose"]}.get(args.log_level, [])
    return argv + (["--log-all-ranks"] if args.log_all_ranks else []) + (["--progress"] if args.progress else [])
