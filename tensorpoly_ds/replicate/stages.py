"""The stages before the analysis: prep, multi-task pretraining runs, the adaptation job list.

Layout under OUT (every stage skips what is already complete, so a rerun resumes):
    data/<variant>/k<k>/            prepared data (tensorpoly-ds prep), one directory per few-shot size
    pretrain/<variant>/<method>/    tensorpoly-ds pretrain run (run.yaml, metrics.jsonl, export/)
    adapt/<variant>/lr<lr>/jobs/<id>/          few-shot jobs (result.json + COMPLETE), id = label, mode, task, k, seed
    adapt/<variant>/zeroshot/mt<steps>/jobs/<id>/   zero-shot rows
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tpds_common.errors import ConfigError

from ..adapt.table import expand_grid
from ..adapters import AdapterConfig
from .config import FULLFT, MethodSpec, ReplicateConfig, Variant, World


def slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


# --- prep --------------------------------------------------------------------------------------------------


def data_dir(out: Path, variant: str, k: int) -> Path:
    return out / "data" / variant / f"k{k}"


def prep_all(cfg: ReplicateConfig, out: Path) -> None:
    """One prepared directory per (variant, k). Every directory uses the tokenizer built for the first
    variant's first directory, so that one backbone serves every variant (same vocabulary, same ids); the
    first variant's prompts must therefore contain every word of the others' (checked: no unknown word)."""
    from data_prep.pipeline import PrepConfig, build

    shared_tokenizer = None
    for variant in cfg.variants:
        for k in cfg.prep.ks:
            target = data_dir(out, variant.name, k)
            pc = PrepConfig(
                mixture=variant.mixture,
                source="embedded",
                tokenizer=str(shared_tokenizer) if shared_tokenizer else "embedded",
                out=target,
                num_shards=1,
                val_per_template=cfg.prep.val_per_template,
                cap_per_template=cfg.prep.cap_per_template,
                few_shot_seeds=tuple(cfg.all_seeds()),
                few_shot_k=k,
            )
            result = build(pc)
            if shared_tokenizer is None:
                shared_tokenizer = target / "tokenizer"
            elif result.status == "built":
                check_no_unknown_words(target, variant.name, cfg.variants[0].name)


def check_no_unknown_words(directory: Path, variant: str, first: str) -> None:
    """Every token id of every prepared split is a known word (the shared tokenizer covers the variant)."""

    from data_prep.manifest import load_split, read_manifest
    from data_prep.tokenizer import SPECIALS

    m = read_manifest(directory)
    unk = SPECIALS.index("<unk>")
    for split in m.shards:
        ds = load_split(directory, split)
        for col in ("input_ids", "target_ids", "choice_ids"):
            if col not in ds.column_names:
                continue
            values = ds.data.column(col).combine_chunks()
            while hasattr(values, "flatten"):  # list<int> and list<list<int>> down to the ids
                values = values.flatten()
            ids = values.to_numpy(zero_copy_only=False)
            if (ids == unk).any():
                raise ConfigError(
                    f"{directory}: split {split!r} column {col!r} has {int((ids == unk).sum())} "
                    f"unknown words: the shared tokenizer (of variant {first!r}) does not cover "
                    f"variant {variant!r}; list the variant with the richest prompts first"
                )


# --- multi-task pretraining ----------------------------------------------------------------------------------


@dataclass
class PretrainRun:
    variant: str
    method: MethodSpec
    run_dir: Path
    config: dict  # the run config written to run_dir/run.yaml

    @property
    def export(self) -> Path:
        return self.run_dir / "export"

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.method.label}"

    def done(self) -> bool:
        return (self.export / "adapter_config.json").is_file()


def world_root(out: Path, world: World) -> Path:
    """Where a world's pretraining runs and adaptation jobs live: OUT itself for the unnamed single world."""
    return out / "worlds" / world.name if world.name else out


def run_config(cfg: ReplicateConfig, data: Path, backbone: Path, world: World, m: MethodSpec, run_dir: Path) -> dict:
    """The pretraining run config of method `m` in `world` at its recipe's learning rates
    (replicate.config.PRETRAIN_RUN_CONFIG)."""
    return cfg.pretrain_run_config(m, world, {"backbone": str(backbone), "data": str(data), "dir": str(run_dir)})


def searched_methods(cfg: ReplicateConfig) -> list[tuple[Variant, MethodSpec]]:
    return [
        (v, m)
        for v in cfg.variants
        for m in cfg.methods_for(v.name)
        if m.is_pretrained() and cfg.method_pretrain(m)["search"]
    ]


def search_dir(out: Path, cfg: ReplicateConfig, variant: str, label: str) -> Path:
    return world_root(out, cfg.world_list()[0]) / "lr_search" / variant / slug(label)


def search_pretraining_lrs(
    cfg: ReplicateConfig, out: Path, backbone: Path, workers: int, threads: int
) -> dict[tuple[str, str], dict]:
    """tensorpoly_ds.engine.lr_search for every searched method of every variant, in the first world;
    {(variant, label): the search result}. Methods search side by side, one candidate run each at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from ..engine import lr_search
    from ..engine.run_pool import ensure_engine_ops, run_pretraining
    from ..engine.stop import STOP

    spec = lr_search.LrSearchSection(**cfg.pretrain.lr_search)
    spec.validate(f"{cfg.source}: pretrain.lr_search")
    world = cfg.world_list()[0]
    todo = []
    for variant, m in searched_methods(cfg):
        data = data_dir(out, variant.name, max(cfg.prep.ks))
        d = search_dir(out, cfg, variant.name, m.label)
        todo.append(((variant.name, m.label), run_config(cfg, data, backbone, world, m, d), d))
    if not todo:
        return {}
    ensure_engine_ops()  # once, before the threads: every run loads DeepSpeed's op from the same cache

    def one(item):
        key, base, d = item
        result = lr_search.search(
            base, spec, d, lambda runs: run_pretraining(runs, d, 1, threads), label=f"{key[0]}/{key[1]}"
        )
        return key, result

    # a stop request (Ctrl-C, SIGTERM) reaches the threads' schedulers through the process-wide STOP, which only
    # the main thread can install
    with STOP.handling(), ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, todo))


def pretrain_runs(
    cfg: ReplicateConfig,
    out: Path,
    backbone: Path,
    world: World | None = None,
    searched: dict[tuple[str, str], dict] | None = None,
) -> list[PretrainRun]:
    """Every pretrained method's run in `world` (default: the first), at its recipe's learning rates or at
    those its search chose. In the first world a searched method's run is its chosen candidate run (the same
    config) when the candidates ran the full budget."""
    from ..engine import lr_search

    world = world or cfg.world_list()[0]
    first = world == cfg.world_list()[0]
    runs = []
    for variant in cfg.variants:
        # the largest-k directory: its training split is the same in every k directory of the variant
        data = data_dir(out, variant.name, max(cfg.prep.ks))
        for m in cfg.methods_for(variant.name):
            if not m.is_pretrained():
                continue
            run_dir = world_root(out, world) / "pretrain" / variant.name / slug(m.label)
            config = run_config(cfg, data, backbone, world, m, run_dir)
            key = (variant.name, m.label)
            if searched and key in searched:
                chosen = searched[key]["chosen"]
                spec = lr_search.LrSearchSection(**cfg.pretrain.lr_search)
                if first and spec.steps in (None, cfg.pretrain.steps):
                    cand = lr_search.candidate(config, chosen, spec.steps, search_dir(out, cfg, *key) / "runs")
                    run_dir, config = cand.run_dir, cand.config
                else:
                    config["optim"].update(chosen)
            runs.append(PretrainRun(variant.name, m, run_dir, config))
    return runs


# --- the adaptation jobs ---------------------------------------------------------------------------------------


def _job_base(cfg: ReplicateConfig, backbone: Path) -> dict:
    return {"model": str(backbone), **cfg.adapt_job_base()}


def _entry(m: MethodSpec, exports: dict[str, Path]) -> dict:
    if m.is_pretrained():
        return {"label": m.label, "export": str(exports[m.label])}
    fresh = dict(m.fresh)
    method = fresh.pop("method")
    return {"label": m.label, "method": method, **({"adapter": fresh} if method != FULLFT else {})}


def variant_tasks(cfg: ReplicateConfig, out: Path, variant: str) -> list[str]:
    """The variant's held-out tasks (its manifest's), restricted to adapt.tasks when that is set."""
    from data_prep.manifest import read_manifest

    held = list(read_manifest(data_dir(out, variant, max(cfg.prep.ks))).held_out)
    if cfg.adapt.tasks is None:
        return held
    tasks = [t for t in held if t in cfg.adapt.tasks]
    if not tasks:
        raise ConfigError(f"adapt.tasks {cfg.adapt.tasks} names none of variant {variant!r}'s held-out tasks {held}")
    return tasks


def adaptation_rows(
    cfg: ReplicateConfig,
    out: Path,
    variant: Variant,
    backbone: Path,
    exports: dict[str, Path],
    chosen_lr: dict[tuple[str, int], float] | None = None,
    *,
    world: World | None = None,
    extra_lrs: dict[tuple[str, int], list[float]] | None = None,
) -> list[dict]:
    """The jobs of one variant in one world (default: the first) as job-table rows
    (tensorpoly_ds.adapt.table.expand_grid, so every job is validated now). Without `chosen_lr` (phase 1, the
    first world): every lr of the grid, plus the row's `extra_lrs` (edge-rule extensions), for the search
    seeds; with `chosen_lr` ({(row name, k): lr}, chosen on phase 1's dev scores): every seed of the world at
    its row's chosen lr (phase 2; the search seeds' jobs are the same directories, already complete). The
    zero-shot rows come with a world's first phase."""
    world = world or cfg.world_list()[0]
    first = world == cfg.world_list()[0]
    root = world_root(out, world) / "adapt" / variant.name
    tasks = variant_tasks(cfg, out, variant.name)
    rows = _few_shot_rows(cfg, out, variant, backbone, exports, chosen_lr, world, extra_lrs or {}, tasks, root)
    if variant.name in cfg.zero_shot.variants and (chosen_lr is None) == first:
        rows += _zero_shot_rows(cfg, out, variant, backbone, exports, world, tasks, root)
    for i, r in enumerate(rows):
        r["row"] = i
    return rows


def _few_shot_rows(
    cfg: ReplicateConfig,
    out: Path,
    variant: Variant,
    backbone: Path,
    exports: dict[str, Path],
    chosen_lr: dict[tuple[str, int], float] | None,
    world: World,
    extra_lrs: dict[tuple[str, int], list[float]],
    tasks: list[str],
    root: Path,
) -> list[dict]:
    """adaptation_rows' few-shot jobs: lr by lr (the grid's, then the extensions beyond it), every method, mode
    and k whose row runs at that lr in this phase."""
    from .analysis import row_name

    search = cfg.search_seeds()
    beyond_grid = {x for v in extra_lrs.values() for x in v} | set((chosen_lr or {}).values())
    extensions = sorted(beyond_grid - set(cfg.adapt.lrs))
    rows: list[dict] = []
    for lr in [*cfg.adapt.lrs, *extensions]:
        for m in cfg.methods_for(variant.name):
            for mode in cfg.modes_for(variant, m):
                for k in cfg.prep.ks:
                    name = row_name({"label": m.label, "mode": mode, "k": k, "job": {}})
                    if chosen_lr is None:
                        if lr not in cfg.adapt.lrs and lr not in extra_lrs.get((name, k), ()):
                            continue
                        seeds = search
                    else:
                        if chosen_lr.get((name, k)) != lr:
                            continue
                        seeds = world.seeds
                    grid = {
                        "base": {
                            **_job_base(cfg, backbone),
                            "lr": lr,
                            "routing_lr": lr * cfg.adapt.routing_lr_scale,
                            "data_dir": str(data_dir(out, variant.name, k)),
                        },
                        "methods": [_entry(m, exports)],
                        "modes": [mode],
                        "tasks": tasks,
                        "seeds": seeds,
                        "ks": [k],
                    }
                    rows += expand_grid(grid, root / lr_tag(lr))
    return rows


def _zero_shot_rows(
    cfg: ReplicateConfig,
    out: Path,
    variant: Variant,
    backbone: Path,
    exports: dict[str, Path],
    world: World,
    tasks: list[str],
    root: Path,
) -> list[dict]:
    """adaptation_rows' zero-shot jobs: every zero_shot method after each number of multi-task steps."""
    z = cfg.zero_shot
    rows: list[dict] = []
    for steps in z.multitask_steps:
        for label in z.methods:
            m = cfg.method(label)
            mode = "mu" if AdapterConfig.from_dict(m.adapter).routed else "full"  # mu = average the modules
            base = {
                **_job_base(cfg, backbone),
                "lr": z.lr,
                "routing_lr": z.lr * cfg.adapt.routing_lr_scale,
                "multitask_steps": steps,
                "multitask_batch_size": z.multitask_batch_size,
                "data_dir": str(data_dir(out, variant.name, max(cfg.prep.ks))),
            }
            # without multi-task steps every seed gives the same numbers; kept so that rows pair up
            grid = {
                "base": base,
                "methods": [_entry(m, exports)],
                "modes": [mode],
                "tasks": tasks,
                "seeds": world.seeds,
                "ks": [0],
            }
            rows += expand_grid(grid, root / "zeroshot" / f"mt{steps}")
    return rows


def sensitivity_rows(
    cfg: ReplicateConfig,
    out: Path,
    variant: Variant,
    backbone: Path,
    searched: dict,
    chosen_lr: dict[tuple[str, int], float],
) -> list[dict]:
    """The jobs of the selection rule's sensitivity check (pretrain.sensitivity): every module-lr candidate of
    every search of this variant, adapted in the method's first mode for the search seeds on every task, at its
    row's chosen adaptation lr (largest k)."""
    from ..engine.lr_search import candidate
    from .analysis import row_name

    rows: list[dict] = []
    tasks = variant_tasks(cfg, out, variant.name)
    k = max(cfg.prep.ks)
    for m in cfg.methods_for(variant.name):
        found = searched.get((variant.name, m.label))
        if found is None:
            continue
        mode = cfg.modes_for(variant, m)[0]
        lr = chosen_lr[(row_name({"label": m.label, "mode": mode, "k": k, "job": {}}), k)]
        base = run_config(cfg, data_dir(out, variant.name, k), backbone, cfg.world_list()[0], m, Path("."))
        for value in sorted(float(x) for x in found["axes"][0]["losses"]):
            lrs = module_axis_lrs(cfg, m, found, value)
            cand = candidate(
                base, lrs, cfg.pretrain.lr_search.get("steps"), search_dir(out, cfg, variant.name, m.label) / "runs"
            )
            grid = {
                "base": {
                    **_job_base(cfg, backbone),
                    "lr": lr,
                    "routing_lr": lr * cfg.adapt.routing_lr_scale,
                    "data_dir": str(data_dir(out, variant.name, k)),
                },
                "methods": [{"label": m.label, "export": str(cand.run_dir / "export")}],
                "modes": [mode],
                "tasks": tasks,
                "seeds": cfg.search_seeds(),
                "ks": [k],
            }
            rows += expand_grid(grid, sensitivity_dir(out, cfg, variant.name, m.label, lrs))
    return rows


def module_axis_lrs(cfg: ReplicateConfig, m: MethodSpec, found: dict, value: float) -> dict[str, float]:
    """The learning rates of a search's module-axis candidate at `value`: the axis ran at the recipe's routing
    lr, which the search fixed (and so chose a routing lr for) only under learned routing."""
    fixed = {"routing_lr": float(cfg.method_pretrain(m)["routing_lr"])} if "routing_lr" in found["chosen"] else {}
    return {**fixed, found["axes"][0]["key"]: float(value)}


def sensitivity_dir(out: Path, cfg: ReplicateConfig, variant: str, label: str, lrs: dict[str, float]) -> Path:
    """The sensitivity jobs of one candidate (its learning rates `lrs`) of one method's search."""
    from ..engine.lr_search import candidate_tag

    return world_root(out, cfg.world_list()[0]) / "sensitivity" / variant / slug(label) / slug(candidate_tag(lrs))


# Fields added after the first published protocol: at these values they change nothing, so they stay out of
# protocol.json and an OUT written before they existed still resumes.
_NEUTRAL = {
    ("worlds",): None,
    ("pretrain", "lr_search"): None,
    ("pretrain", "untrained_reference"): None,
    ("pretrain", "untrained_factor"): 2.0,
    ("pretrain", "untrained_task_blind_reference"): None,
    ("pretrain", "sensitivity"): False,
    ("adapt", "max_extensions"): 0,
    ("pretrain", "run_config"): {},
}


def protocol(cfg: ReplicateConfig) -> dict:
    """Everything in the config that changes a number: a rerun into the same OUT must match it."""
    body = asdict(cfg)
    for key in ("workers", "out", "cache", "source"):
        body.pop(key)
    for path, neutral in _NEUTRAL.items():
        holder = body
        for part in path[:-1]:
            holder = holder[part]
        if holder.get(path[-1], neutral) == neutral:
            holder.pop(path[-1], None)
    for m in body["methods"]:
        if m.get("pretrain") is None:
            m.pop("pretrain", None)
    return body
