"""Every entry point maps errors in one place, tpds_common.errors.report_user_errors (run by `tensorpoly-ds` and by
each module's `__main__`): a user error is one line `prog: message` naming the field/file and the value, with the
documented exit code (README, "Exit codes"; `report` has no user error of its own: an unreadable table is
listed in its report, not fatal); anything else is a bug and propagates with its traceback instead
of posing as bad input (exit 2).

Mutations tried: launch/cli.py calling `entry(rest)` without report_user_errors (every user-error case fails:
the ConfigError escapes); report_user_errors catching Exception (every bug case fails: exit 2 instead of the
exception); launch/plan.py catching ValueError again around its body (test_a_bug_propagates[plan] fails);
launch/sweep.py's read_grid without read_text (the missing grid is a FileNotFoundError traceback:
test_a_user_error_is_one_line_and_its_exit_code[sweep] fails); launch/replicate.py's `__main__` back to
`sys.exit(main())` (test_module_main_blocks_map_errors fails naming launch/replicate.py, and
test_python_m_reports_one_line fails with a traceback and exit 1)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]


def user_error_cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    """subcommand -> (argv, exit code, what the one line must say); each is refused before any real work."""
    missing = tmp / "missing.yaml"
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    return {
        "params": (["params", "--model", "tiny", "--method", "lora", "--rank", "0"], 2, "'rank' = 0"),
        "plan": (["plan", "--model", "tiny", "--method", "lora", "--gpus", "0"], 2, "--gpus 0: must be >= 1"),
        "prep": (
            [
                "prep",
                "--mixture",
                "nope",
                "--source",
                "embedded",
                "--tokenizer",
                "embedded",
                "--out",
                str(tmp / "prep"),
            ],
            2,
            "unknown mixture 'nope'",
        ),
        "pretrain": (["pretrain", "--config", str(missing)], 2, f"{missing}: config file not found"),
        "lr-search": (
            ["lr-search", "--config", str(missing), "--module-lrs", "1e-3", "--out", str(tmp / "lr"), "--workers", "0"],
            2,
            "--workers 0: must be >= 1",
        ),
        "adapt": (["adapt", "--job", str(tmp / "job.json")], 2, f"{tmp / 'job.json'}: cannot read the --job file"),
        "sweep": (
            ["sweep", "--grid", str(missing), "--out", str(tmp / "sweep")],
            2,
            f"{missing}: config file not found",
        ),
        "export": (
            ["export", "--format", "peft", "--adapter", str(empty), "--out", str(tmp / "peft")],
            2,
            "no adapter export here",
        ),
        "import": (
            ["import", "--format", "peft", "--adapter", str(empty), "--out", str(tmp / "ours")],
            2,
            "no peft adapter here",
        ),
        "replicate": (["replicate", "--config", str(missing), "--stages", "prep,nope"], 2, "unknown stage(s) ['nope']"),
        "demo": (
            ["demo", "--config", str(missing), "--out", str(tmp / "demo")],
            2,
            f"{missing}: config file not found",
        ),
    }


@pytest.mark.parametrize(
    "name",
    ["params", "plan", "prep", "pretrain", "lr-search", "adapt", "sweep", "export", "import", "replicate", "demo"],
)
def test_a_user_error_is_one_line_and_its_exit_code(name, tmp_path, capsys):
    argv, code, needle = user_error_cases(tmp_path)[name]
    assert cli_main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"tensorpoly-ds {name}: ") and needle in last, err


def _bug(exc_type):
    def boom(*args, **kwargs):
        raise exc_type("internal bug, not bad input")

    return boom


# subcommand -> (argv, (module, function) a bug is planted in, the plain exception it raises); the plan,
# sweep and adapt cases were exit 2 before (their mains caught ValueError), lr-search and replicate exit 1
# with one line (they caught RuntimeError)
BUGS = {
    "plan": (
        ["plan", "--model", "tiny", "--method", "lora", "--gpu-mem", "40GB"],
        ("launch.plan", "parse_size"),
        ValueError,
    ),
    "sweep": (["sweep", "--grid", "g.yaml", "--out", "{tmp}/sweep"], ("launch.sweep", "read_grid"), ValueError),
    "adapt": (["adapt", "--job-table", "t.jsonl", "--row", "0"], ("launch.adapt", "table_job"), ValueError),
    "prep": (
        ["prep", "--mixture", "embedded", "--source", "embedded", "--tokenizer", "embedded", "--out", "{tmp}/prep"],
        ("data_prep.cli", "build"),
        ValueError,
    ),
    "pretrain": (["pretrain", "--config", "c.yaml"], ("tensorpoly_ds.engine.config", "load_run_config"), ValueError),
    "lr-search": (
        ["lr-search", "--config", "c.yaml", "--module-lrs", "1e-3", "--out", "{tmp}/lr"],
        ("tensorpoly_ds.engine.config", "load_run_config"),
        RuntimeError,
    ),
    "replicate": (["replicate", "--config", "c.yaml"], ("tensorpoly_ds.replicate.config", "load_config"), RuntimeError),
    "export": (
        ["export", "--format", "peft", "--adapter", "a", "--out", "{tmp}/p"],
        ("tensorpoly_ds.adapters.peft_interop", "export_to_peft"),
        ValueError,
    ),
    "params": (["params", "--model", "tiny", "--method", "lora"], ("launch.params", "count_parameters"), ValueError),
}


@pytest.mark.parametrize("name", list(BUGS))
def test_a_bug_propagates_with_its_traceback(name, tmp_path, monkeypatch, capsys):
    import importlib

    argv, (module, function), exc_type = BUGS[name]
    monkeypatch.setattr(importlib.import_module(module), function, _bug(exc_type))
    with pytest.raises(exc_type, match="internal bug") as info:
        cli_main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert type(info.value) is exc_type  # not wrapped into a user error
    assert "internal bug" not in capsys.readouterr().err  # no one-line "bad input" report of it


def _main_blocks() -> dict[str, str]:
    """module file -> the source of its `if __name__ == "__main__":` block (data_prep/__main__.py: whole)."""
    blocks = {"data_prep/__main__.py": (REPO / "data_prep" / "__main__.py").read_text()}
    for path in sorted((REPO / "launch").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                blocks[f"launch/{path.name}"] = ast.unparse(node)
    return blocks


def test_module_main_blocks_map_errors():
    blocks = _main_blocks()
    assert {"launch/adapt.py", "launch/pretrain.py", "launch/sweep.py", "data_prep/__main__.py"} <= set(blocks)
    # launch/cli.py's main() itself calls report_user_errors (every other test here runs through it)
    unmapped = [name for name, src in blocks.items() if "report_user_errors(" not in src and name != "launch/cli.py"]
    assert not unmapped, f"`__main__` blocks that bypass report_user_errors: {unmapped}"


@pytest.mark.parametrize(
    "module, argv, prog, needle",
    [
        (
            "launch.replicate",
            ["--config", "x.yaml", "--stages", "nope"],
            "tensorpoly-ds replicate",
            "unknown stage(s) ['nope']",
        ),
        (
            "data_prep",
            ["--mixture", "nope", "--source", "embedded", "--tokenizer", "embedded", "--out", "o"],
            "python -m data_prep",
            "unknown mixture 'nope'",
        ),
    ],
)
def test_python_m_reports_one_line(module, argv, prog, needle, tmp_path):
    """What a Slurm script or a sweep worker runs: `python -m MODULE`, through the module's `__main__`."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"{prog}: ") and needle in lines[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
