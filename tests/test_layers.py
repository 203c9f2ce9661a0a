"""The import graph points down: tpds_common < data_prep < tensorpoly_ds < launch (entry points). A module
imports only its own package or a lower one (function-level imports included), the library never imports a
CLI module, and no private name (`_x`) is imported from another module.
Mutations tried: `from launch.sweep import job_env` back in engine/run_pool.py (rule 1 fails, naming the
file and line); `from tensorpoly_ds.locking import FolderLock` in data_prep/pipeline.py (rule 1);
`from .checkpoint import seed_all as _seed_all` imported as `_seed_all` elsewhere (rule 3)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"tpds_common": 0, "data_prep": 1, "tensorpoly_ds": 2, "launch": 3}
CLI_MODULES = {"data_prep.cli"}  # command-line modules that live inside a library package


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(line, imported module, imported names) for every import in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base, [a.name for a in node.names]


def _files():
    for top in LAYERS:
        yield from sorted((ROOT / top).rglob("*.py"))


def test_imports_only_point_down():
    bad = []
    for path in _files():
        own = LAYERS[path.relative_to(ROOT).parts[0]]
        for line, target, _ in _imports(path):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS[top] > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports running up the layers:\n" + "\n".join(bad)


def test_library_never_imports_a_cli_module():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in _files()
        if not path.relative_to(ROOT).parts[0] == "launch"
        for line, target, names in _imports(path)
        if (target in CLI_MODULES or any(f"{target}.{n}" in CLI_MODULES for n in names))
        and _module_name(path) not in CLI_MODULES
        and path.name != "__main__.py"
    ]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {n} from {target}"
        for path in _files()
        for line, target, names in _imports(path)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_the_graph_sees_the_whole_tree():
    # guards the test itself: a walk that found no files, or no imports, would pass vacuously
    files = list(_files())
    assert len(files) > 100
    targets = {t for p in files for _, t, _ in _imports(p)}
    assert {"tpds_common.locking", "data_prep.manifest", "tensorpoly_ds.engine.checkpoint"} <= targets
