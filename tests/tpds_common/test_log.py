"""One logging path (tpds_common.log): rank-aware levels, the rank in each line, --quiet/--verbose, idempotent
setup, progress bars only on a terminal or when asked, and a real entry point silenced by --quiet.

Mutations tried, each failing the test named:
- setup_logging without the `level = max(level, WARNING)` on rank != 0: test_rank_0_logs_info_other_ranks_only_warnings
- all_ranks ignored (always False): test_every_rank_logs_when_asked
- the rank prefix always "" (never `[rank R] `): test_each_line_carries_rank_and_component_on_a_multi_rank_world
- env_rank() reading only RANK (not SLURM_PROCID): test_rank_and_world_come_from_the_launcher_variables
- --quiet's const INFO instead of WARNING: test_quiet_hides_info_but_not_warnings
- --verbose's const INFO instead of DEBUG: test_verbose_shows_debug
- setup_logging no longer removing its previous handler: test_setup_twice_does_not_duplicate_lines
- progress_enabled returning True off a TTY: test_progress_bars_off_when_stderr_is_not_a_terminal
- progress_enabled ignoring the rank: test_progress_bars_never_on_other_ranks
- TPDS_PROGRESS not read: test_progress_bars_on_when_asked
- capture() not lowering the logger level under --quiet: test_capture_sees_info_under_quiet_without_unquieting
- data_prep.pipeline's "wrote" line logged at WARNING: test_quiet_silences_a_real_entry_points_info_lines
- add_logging_arguments dropped from launch/report.py: test_every_entry_point_takes_the_shared_flags
- the dispatcher calling entry(rest) instead of entry(lead + rest): test_the_dispatcher_passes_leading_flags_on
- split_logging_flags with allow_abbrev on: test_a_wrapper_takes_only_its_flags_from_the_arguments_it_passes_on
"""

import argparse
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpds_common.log import (
    add_logging_arguments,
    capture,
    get_logger,
    progress,
    progress_enabled,
    setup_from_args,
    setup_logging,
    split_logging_flags,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    """No rank variables from the test runner's environment (tests/conftest.py restores os.environ)."""
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "TPDS_LOG_ALL_RANKS", "TPDS_PROGRESS"):
        monkeypatch.delenv(var, raising=False)


def _emit_all(component: str = "replicate") -> None:
    log = get_logger(component)
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")


def _lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def _parsed(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_logging_arguments(parser)
    return parser.parse_args(list(flags))


def test_rank_0_logs_info_other_ranks_only_warnings():
    zero, one = io.StringIO(), io.StringIO()
    setup_logging(logging.INFO, rank=0, world=2, stream=zero)
    _emit_all()
    setup_logging(logging.INFO, rank=1, world=2, stream=one)
    _emit_all()
    assert _lines(zero) == ["[rank 0] [replicate] an info line", "[rank 0] [replicate] a warning line"]
    assert _lines(one) == ["[rank 1] [replicate] a warning line"]


def test_every_rank_logs_when_asked(monkeypatch):
    flag, env = io.StringIO(), io.StringIO()
    setup_logging(logging.INFO, rank=3, world=4, all_ranks=True, stream=flag)
    _emit_all()
    monkeypatch.setenv("TPDS_LOG_ALL_RANKS", "1")
    setup_logging(logging.INFO, rank=3, world=4, stream=env)
    _emit_all()
    assert _lines(flag) == _lines(env) == ["[rank 3] [replicate] an info line", "[rank 3] [replicate] a warning line"]
    assert _parsed("--log-all-ranks").log_all_ranks is True and _parsed().log_all_ranks is None


def test_each_line_carries_rank_and_component_on_a_multi_rank_world():
    multi, single = io.StringIO(), io.StringIO()
    setup_logging(logging.INFO, rank=0, world=16, stream=multi)
    get_logger("sweep").info("row 3: done\nsecond line")
    get_logger().info("no component")
    setup_logging(logging.INFO, rank=0, world=1, stream=single)
    get_logger("prep").info("wrote x")
    assert _lines(multi) == ["[rank 0] [sweep] row 3: done", "second line", "[rank 0] no component"]
    assert _lines(single) == ["[prep] wrote x"]  # one process: the lines read as they did before


@pytest.mark.parametrize(
    "env", [{"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}], ids=["torchrun", "srun"]
)
def test_rank_and_world_come_from_the_launcher_variables(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    buf = io.StringIO()
    setup_logging(stream=buf)
    _emit_all("tensorpoly-ds")
    assert _lines(buf) == ["[rank 1] [tensorpoly-ds] a warning line"]


def test_quiet_hides_info_but_not_warnings():
    default, quiet = io.StringIO(), io.StringIO()
    args = _parsed()
    setup_logging(args.log_level, stream=default)
    _emit_all()
    setup_logging(_parsed("--quiet").log_level, stream=quiet)
    _emit_all()
    assert _lines(default) == ["[replicate] an info line", "[replicate] a warning line"]
    assert _lines(quiet) == ["[replicate] a warning line"]


def test_verbose_shows_debug():
    buf = io.StringIO()
    setup_logging(_parsed("--verbose").log_level, stream=buf)
    _emit_all()
    assert _lines(buf) == ["[replicate] a debug line", "[replicate] an info line", "[replicate] a warning line"]
    with pytest.raises(SystemExit):  # one level: the two flags exclude each other
        _parsed("--quiet", "--verbose")


def test_setup_twice_does_not_duplicate_lines(capsys):
    setup_from_args(_parsed())
    setup_from_args(_parsed())
    get_logger("adapt").info("once")
    assert len([h for h in logging.getLogger("tpds").handlers if getattr(h, "_tpds_setup", False)]) == 1
    # stderr, resolved at each line (capsys replaces sys.stderr): never stdout, which carries results
    captured = capsys.readouterr()
    assert captured.err == "[adapt] once\n" and captured.out == ""


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_bars_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert not progress_enabled(rank=0)
    assert progress(range(2), rank=0).disable
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert progress_enabled(rank=0) and not progress(range(2), rank=0).disable
    monkeypatch.setenv("TPDS_PROGRESS", "0")  # asked not to, even on a terminal
    assert not progress_enabled(rank=0)


def test_progress_bars_never_on_other_ranks(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    monkeypatch.setenv("TPDS_PROGRESS", "1")
    setup_logging(progress=True, rank=1, world=2)
    assert not progress_enabled(rank=1) and progress(range(2), rank=1).disable
    monkeypatch.setenv("RANK", "1")  # the rank from the launcher when not given
    assert progress(range(2)).disable


def test_progress_bars_on_when_asked(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    monkeypatch.setenv("TPDS_PROGRESS", "1")
    assert progress_enabled(rank=0) and not progress(range(2), rank=0).disable
    monkeypatch.delenv("TPDS_PROGRESS")
    setup_from_args(_parsed("--progress"))
    assert progress_enabled(rank=0)
    assert progress(range(2), rank=0, disable=True).disable  # a caller's own disable=True still wins


def test_capture_sees_info_under_quiet_without_unquieting():
    """A replicate worker keeps each job's messages in the job's log.txt whatever the terminal's level."""
    terminal, job_log = io.StringIO(), []
    setup_logging(logging.WARNING, stream=terminal)
    with capture(job_log.append):
        _emit_all("adapt")
    get_logger("adapt").info("after the job")
    assert job_log == ["[adapt] an info line", "[adapt] a warning line"]
    assert _lines(terminal) == ["[adapt] a warning line"]


def _prep(out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        *flags,
        "prep",
        "--mixture",
        "embedded",
        "--source",
        "embedded",
        "--tokenizer",
        "embedded",
        "--cap-per-template",
        "10",
        "--val-per-template",
        "5",
        "--num-shards",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "TPDS_PROGRESS"):
        env.pop(var, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_quiet_silences_a_real_entry_points_info_lines(tmp_path):
    """`tensorpoly-ds prep` logs its progress to stderr; `tensorpoly-ds --quiet prep` (the dispatcher passes the
    flag on) prints nothing at all and still builds the same data. Off a terminal no progress bar either."""
    loud = _prep(tmp_path / "loud")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert f"[prep] wrote {tmp_path / 'loud'}: " in loud.stderr and loud.stdout == ""
    assert "Preparing configs" not in loud.stderr  # the tqdm bar's label: stderr is a pipe here
    quiet = _prep(tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "[prep]" not in quiet.stderr and "wrote" not in quiet.stderr and quiet.stdout == "", quiet.stderr
    assert (tmp_path / "quiet" / "manifest.json").is_file()


def _calls(module: str) -> set[str]:
    import ast

    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    return {
        node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }


def test_every_entry_point_takes_the_shared_flags():
    """Each subcommand's module (and the torchrun wrapper) builds its flags with the one helper and sets
    logging up from them; read from the source, so no entry point's heavy imports run here.
    Mutation: add_logging_arguments(p) dropped from launch/report.py -> fails naming launch.report."""
    from launch.cli import SUBCOMMANDS

    modules = {target.partition(":")[0] for target, _ in SUBCOMMANDS.values()}
    assert {"launch.pretrain", "data_prep.cli", "launch.interop"} <= modules
    for module in sorted(modules):
        assert {"add_logging_arguments", "setup_from_args"} <= _calls(module), module
    assert {"split_logging_flags", "setup_from_args"} <= _calls("launch.torchrun")


def test_a_wrapper_takes_only_its_flags_from_the_arguments_it_passes_on():
    """The torchrun wrapper reads the script's --quiet and passes every other argument on unchanged.
    Mutation: allow_abbrev left on -> torchrun-style `--prog` is taken for --progress."""
    args, rest = split_logging_flags(["--nproc-per-node", "2", "--prog", "launch/pretrain.py", "--quiet", "x=1"])
    assert args.log_level == logging.WARNING and args.progress is None
    assert rest == ["--nproc-per-node", "2", "--prog", "launch/pretrain.py", "x=1"]


def test_the_dispatcher_passes_leading_flags_on(capsys):
    """`tensorpoly-ds --quiet params ...` sets the subcommand's logging up at WARNING; the result still prints.
    Mutation: main() dropping `lead` (entry(rest)) -> the level stays INFO and the test fails."""
    from launch.cli import main

    assert main(["--quiet", "params", "--model", "tiny", "--method", "lora", "--json"]) == 0
    assert '"modules"' in capsys.readouterr().out  # the command's result: stdout, whatever the level
    assert logging.getLogger("tpds").level == logging.WARNING
    with pytest.raises(SystemExit):
        main(["--quiet", "--verbose", "params", "--model", "tiny", "--method", "lora"])
