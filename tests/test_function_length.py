"""No function in tensorpoly_ds/ or data_prep/ is longer than MAX_LINES unless it reads as one idea (issue #17).

A function's length runs from its `def` line to the last line of its body, as `ruff format` lays it out (CI
checks the formatting, so the file's lines are the formatted ones); decorators do not count, nested functions
and methods are functions of their own (and count inside the function around them too). A longer function is
split into named steps, or, if it reads as one idea (a table of constants, one linear recipe that splitting
would only obscure), listed in ALLOWED with the reason.

Mutations tried: a 90-line function appended to data_prep/parts.py (test_no_new_long_function fails naming
`data_prep/parts.py:<line> _long (90 lines)`); an ALLOWED entry for a function that is not long
(`data_prep/parts.py::Worker._held_out`: test_allowed_entries_are_still_long fails, so the list does not rot);
the counter off by one (`end_lineno - lineno` without the +1: test_length_counts_def_to_last_line fails).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tensorpoly_ds", "data_prep")
MAX_LINES = 80

# "path::Qualified.name": why it reads as one idea. Empty since the #17 splits: every function fits.
ALLOWED: dict[str, str] = {}


def function_lengths(source: str, path: str) -> dict[str, tuple[int, int]]:
    """{"path::Qualified.name": (def line, length in lines)} for every function and method of `source`."""
    found: dict[str, tuple[int, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found[f"{path}::{name}"] = (child.lineno, child.end_lineno - child.lineno + 1)
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source, path), "")
    return found


def long_functions() -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found.update(function_lengths(path.read_text(), rel))
    return {name: at for name, at in found.items() if at[1] > MAX_LINES}


def test_length_counts_def_to_last_line():
    def body(indent: int) -> list[str]:
        return [" " * indent + f"x{i} = {i}" for i in range(MAX_LINES - 1)]

    lines = ["import functools", "", "", "@functools.cache", "def fits():", *body(4), "", "", "class C:"]
    lines += ["    def too_long(self):", *body(8), "        y = 0", "", "        def inner():", "            return 1"]
    found = function_lengths("\n".join(lines) + "\n", "m.py")
    assert found["m.py::fits"] == (5, MAX_LINES)  # the decorator (line 4) does not count
    assert found["m.py::C.too_long"][1] == MAX_LINES + 4
    assert found["m.py::C.too_long.inner"][1] == 2


def test_no_new_long_function():
    new = {name: at for name, at in long_functions().items() if name not in ALLOWED}
    assert not new, (
        f"functions longer than {MAX_LINES} lines (split them into named steps, or add them to ALLOWED in "
        f"{Path(__file__).name} with the reason they read as one idea):\n"
        + "\n".join(
            f"  {name.split('::')[0]}:{line} {name.split('::')[1]} ({n} lines)" for name, (line, n) in new.items()
        )
    )


def test_allowed_entries_are_still_long():
    stale = sorted(set(ALLOWED) - set(long_functions()))
    assert not stale, f"ALLOWED lists functions that are no longer over {MAX_LINES} lines (or gone): {stale}"
