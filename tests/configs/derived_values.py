"""Every value the shipped configs derive, as one JSON document (the config-refactor guard, issue #17).

    python -m tests.configs.derived_values --write     # regenerate tests/configs/fixtures/derived_values.json

What a config decides must not move when the configuration code is reorganised: the replicate protocol
(OUT/protocol.json; a published OUT resumes only if it is unchanged), the section digests and backbone cache
keys, the sections the backbone's training run hands the engine (added later, pinned by the code before that
run's config went through a declared mapping), every pretraining run config the replicate stages write (shared
recipe, per-method recipes, lr-search candidates), every adaptation job row (both phases, edge-rule extensions, zero-shot and sensitivity rows),
the prep arguments, the sweep grids' job tables, the claims, the pretraining run configs (alone and composed
with a base) and the adaptation jobs `tensorpoly-ds adapt --set ...` resolves. It was first written by the
code on main before the config refactor; tests/configs/test_derived_values.py checks that it still is.

Nothing here trains or prepares data: an export's method comes from the config (sweep exports are stub folders
holding only adapter_config.json), a variant's
held-out tasks are stubbed (they come from data, not from the config), search results are made up
deterministically. Paths under the temporary root are written as <ROOT>.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "derived_values.json"
STUB_TASKS = ["stub_task_a", "stub_task_b"]
_ROOT_NOW: list[Path] = []  # the temporary root of the running dump

# `tensorpoly-ds adapt` command lines whose resolved job must not change (the --set forms the docs, tests and
# scripts use: JSON strings, numbers, booleans, floats written with an exponent)
ADAPT_COMMANDS = [
    [
        "--method",
        "lora",
        "--task",
        "t",
        "--data",
        "D",
        "--out",
        "O",
        "--set",
        "max_eval_examples=12",
        "--set",
        "eval_batch_size=4",
        "--set",
        'trainer="engine"',
        "--set",
        "zero_stage=3",
        "--set",
        "save_adapter=true",
        "--set",
        "warmup_ratio=0.0",
    ],
    [
        "--method",
        "lora",
        "--task",
        "t",
        "--data",
        "D",
        "--out",
        "O",
        "--set",
        "multitask_steps=2",
        "--set",
        "multitask_batch_size=3",
        "--set",
        'trainer="local"',
    ],
    [
        "--method",
        "poly",
        "--task",
        "t",
        "--data",
        "D",
        "--out",
        "O",
        "--mode",
        "z",
        "--set",
        "lr=1e-3",
        "--set",
        "routing_lr=0.5",
        "--set",
        'adapter={"rank": 2, "skills": 4}',
        "--set",
        "k=null",
        "--set",
        "label=Poly x",
        "--set",
        "max_eval_examples=40",
    ],
]
PREP_COMMANDS = [
    ["--mixture", "embedded", "--source", "embedded", "--tokenizer", "embedded", "--out", "D"],
    [
        "--mixture",
        "t0_train",
        "--source",
        "hub",
        "--tokenizer",
        "bigscience/T0_3B",
        "--out",
        "D",
        "--num-shards",
        "8",
        "--few-shot-seeds",
        "1,2",
        "--cap-per-template",
        "budget:1000",
        "--train-tasks",
        "a,b",
        "--skip-invalid",
    ],
]


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def rows_digest(rows: list[dict]) -> dict:
    """A job table in a few lines: its length, the SHA-256 of every row (paths under the temporary root written
    as <ROOT>, the repository as <REPO>, so the hash does not depend on where it ran), its first and last rows
    in full."""
    import hashlib

    text = (
        json.dumps(rows, sort_keys=True, default=str).replace(str(_ROOT_NOW[0]), "<ROOT>").replace(str(ROOT), "<REPO>")
    )
    return {
        "rows": len(rows),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "first": rows[0] if rows else None,
        "last": rows[-1] if rows else None,
    }


def _run_yaml_digest(config: dict) -> str:
    """The SHA-256 of run.yaml as replicate writes it (key order included: engine.run_pool)."""
    import hashlib

    import yaml

    text = yaml.safe_dump(config, sort_keys=False).replace(str(_ROOT_NOW[0]), "<ROOT>")
    return hashlib.sha256(text.encode()).hexdigest()


def _stub_export(root: Path, label: str, adapter: dict) -> Path:
    path = root / "exports" / label.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"format": 1, "adapter": dict(adapter)}))
    return path


def _fake_searches(cfg, stages) -> dict:
    """A made-up but deterministic result for every searched method: the middle module-lr candidate (the
    routing lr too under learned routing), one module axis over every candidate."""
    from tensorpoly_ds.adapters import AdapterConfig

    spec = cfg.pretrain.lr_search or {}
    module = [float(x) for x in spec.get("module_lrs") or [cfg.pretrain.module_lr]]
    routing = [float(x) for x in spec.get("routing_lrs") or [cfg.pretrain.routing_lr]]
    found = {}
    for variant, m in stages.searched_methods(cfg):
        chosen = {"module_lr": module[len(module) // 2]}
        if AdapterConfig.from_dict(m.adapter).routed:
            chosen["routing_lr"] = routing[len(routing) // 2]
        found[(variant.name, m.label)] = {
            "chosen": chosen,
            "axes": [{"key": "module_lr", "losses": {str(x): 1.0 for x in module}}],
        }
    return found


def _backbone_run(section) -> dict:
    """The sections the backbone's training run hands the engine (replicate.backbone.backbone_run_config)."""
    from tensorpoly_ds.replicate.backbone import backbone_run_config

    run = backbone_run_config(section, 123, Path("backbone"))
    return {name: dataclasses.asdict(getattr(run, name)) for name in ("optim", "train", "deepspeed")}


def replicate_values(path: Path, root: Path) -> dict:
    from tensorpoly_ds.replicate import stages
    from tensorpoly_ds.replicate.analysis import row_name
    from tensorpoly_ds.replicate.backbone import backbone_key
    from tensorpoly_ds.replicate.config import load_config

    cfg = load_config(path)
    out = root / "out" / path.stem
    backbone = root / "backbone"
    worlds = cfg.world_list()
    body: dict = {
        "protocol": stages.protocol(cfg),
        "digests": {
            name: cfg.digest(getattr(cfg, name)) for name in ("prep", "backbone", "pretrain", "adapt", "zero_shot")
        },
        "backbone_keys": {
            w.name: backbone_key(dataclasses.replace(cfg.backbone, seed=w.backbone_seed), "sha", 123) for w in worlds
        },
        "backbone_runs": {
            w.name: _backbone_run(dataclasses.replace(cfg.backbone, seed=w.backbone_seed)) for w in worlds
        },
        "worlds": [dataclasses.asdict(w) for w in worlds],
        "search_seeds": cfg.search_seeds(),
        "recipes": {m.label: cfg.method_pretrain(m) for m in cfg.methods if m.is_pretrained()},
        "claims_path": str(cfg.claims_path()) if cfg.claims_path() else None,
    }
    prep_args = []
    with mock.patch(
        "data_prep.pipeline.build", lambda pc: prep_args.append(pc.output_args()) or mock.Mock(status="unchanged")
    ):
        stages.prep_all(cfg, out)
    body["prep"] = prep_args
    searched = _fake_searches(cfg, stages)
    body["lr_search_bases"] = {
        f"{v.name}/{m.label}": stages.run_config(
            cfg,
            stages.data_dir(out, v.name, max(cfg.prep.ks)),
            backbone,
            worlds[0],
            m,
            stages.search_dir(out, cfg, v.name, m.label),
        )
        for v, m in stages.searched_methods(cfg)
    }
    runs = {}
    for w in worlds:
        for label, s in (("plain", None), ("searched", searched or None)):
            runs[f"{w.name}/{label}"] = [
                {"name": r.name, "run_dir": str(r.run_dir), "config": r.config, "run_yaml": _run_yaml_digest(r.config)}
                for r in stages.pretrain_runs(cfg, out, backbone, w, s)
            ]
    body["pretrain_runs"] = runs
    exports: dict = {}
    for r in runs[f"{worlds[0].name}/plain"]:
        variant, label = r["name"].split("/", 1)
        exports.setdefault(variant, {})[label] = str(Path(r["run_dir"]) / "export")
    methods = {m.label: (m.adapter or m.fresh)["method"] for m in cfg.methods}
    # the method of an export is read from its adapter_config.json: here from the config (nothing is trained)
    with (
        mock.patch.object(stages, "variant_tasks", lambda cfg, out, variant: list(cfg.adapt.tasks or STUB_TASKS)),
        mock.patch("tensorpoly_ds.adapt.table._method_of", lambda e: e.get("method") or methods[e["label"]]),
    ):
        body["adaptation"] = _adaptation_values(cfg, out, backbone, exports, searched, stages, row_name)
    return body


def _adaptation_values(cfg, out, backbone, exports, searched, stages, row_name) -> dict:
    worlds = cfg.world_list()
    found = {}
    for variant in cfg.variants:
        exported = exports.get(variant.name, {})
        phase1 = stages.adaptation_rows(cfg, out, variant, backbone, exported, world=worlds[0])
        jobs = [r["job"] for r in phase1]
        names = sorted({(row_name({**j, "job": j}), j["k"]) for j in jobs if j["k"]})
        top = max(cfg.adapt.lrs)
        extra = {names[0]: [top * 3]} if names else {}
        chosen = {
            key: (top * 3 if key in extra else cfg.adapt.lrs[i % len(cfg.adapt.lrs)]) for i, key in enumerate(names)
        }
        found[variant.name] = {
            "phase1": rows_digest(phase1),
            "phase1_extended": rows_digest(
                stages.adaptation_rows(cfg, out, variant, backbone, exported, world=worlds[0], extra_lrs=extra)
            ),
            "phase2": {
                w.name: rows_digest(stages.adaptation_rows(cfg, out, variant, backbone, exported, chosen, world=w))
                for w in worlds
            },
        }
        if cfg.pretrain.sensitivity:
            found[variant.name]["sensitivity"] = rows_digest(
                stages.sensitivity_rows(cfg, out, variant, backbone, searched, chosen)
            )
    return found


def sweep_values(path: Path, root: Path) -> list:
    from data_prep.mixture import load_t0_tasks
    from tensorpoly_ds.adapt.table import expand_grid, read_grid

    grid = read_grid(path)
    for entry in grid["methods"]:
        if "export" in entry:  # a stub export per pretrained entry, at the path the grid names
            entry["export"] = str(_stub_export(root / "sweep", entry["label"], {"method": "poly"}))
    grid["tasks"] = sorted({t["task"] for t in load_t0_tasks()["held_out_eval"]})
    return rows_digest(expand_grid(grid, root / "sweep_out", base_dir=path.parent, source=str(path)))


def run_config_values() -> dict:
    from tensorpoly_ds.engine.config import load_run_config

    files = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
    base = ROOT / "configs" / "pretrain" / "base_t0_3b.yaml"
    found = {}
    combos = [[p] for p in files] + [[base, p] for p in files if not p.name.startswith("base")]
    for paths in combos:
        key = " + ".join(p.name for p in paths)
        try:
            cfg = load_run_config(paths, ["data.dir=D", "train.steps=7", "optim.lr=1e-3"])
        except ValueError:
            found[key] = "refused"
            continue
        found[key] = {"config": cfg.to_dict(), "fingerprint": cfg.fingerprint()}
    return found


def adapt_command_values() -> list:
    from launch.adapt import build_parser, resolve_job

    return [resolve_job(build_parser().parse_args(argv)).to_dict() for argv in ADAPT_COMMANDS]


def prep_command_values() -> list:
    from data_prep.cli import config_from_args, parser

    found = []
    for argv in PREP_COMMANDS:
        pc = config_from_args(parser().parse_args(argv))
        found.append(
            {"output_args": pc.output_args(), "fields": {k: v for k, v in dataclasses.asdict(pc).items() if k != "out"}}
        )
    return found


def claims_values() -> dict:
    from tensorpoly_ds.analysis.claims import load_claims

    return {
        p.name: [dataclasses.asdict(c) for c in load_claims(p)]
        for p in sorted((ROOT / "configs" / "replicate").glob("claims*.yaml"))
    }


def derived_values() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        _ROOT_NOW[:] = [root]
        body = {
            "replicate": {
                p.name: replicate_values(p, root)
                for p in sorted((ROOT / "configs" / "replicate").glob("*.yaml"))
                if not p.name.startswith("claims")
            },
            "sweep": {
                f"{p.parent.name}/{p.name}": sweep_values(p, root)
                for p in sorted(
                    [*(ROOT / "configs" / "sweep").glob("*.yaml"), *(ROOT / "configs" / "diagnosis").glob("*.yaml")]
                )
            },
            "run_configs": run_config_values(),
            "adapt_commands": adapt_command_values(),
            "prep_commands": prep_command_values(),
            "claims": claims_values(),
        }
        text = json.dumps(_jsonable(body), sort_keys=True, indent=1)
        return json.loads(text.replace(str(root), "<ROOT>").replace(str(ROOT), "<REPO>"))


if __name__ == "__main__":
    values = derived_values()
    if "--write" in sys.argv:
        from tpds_common.files import atomic_write_text

        atomic_write_text(FIXTURE, json.dumps(values, sort_keys=True, indent=1) + "\n")
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
    else:
        print(json.dumps(values, sort_keys=True, indent=1))
