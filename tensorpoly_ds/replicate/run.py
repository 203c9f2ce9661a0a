"""`tensorpoly-ds replicate`: the whole grid from one committed config, resumable stage by stage.

    prep -> backbone (T5-LM analogue, cached) -> multi-task pretraining of every method -> few-shot and
    zero-shot adaptation jobs (in-process worker pool) -> tables, verdicts, routing recovery, plots

Outputs under OUT/results/: results.json (everything), summary.md (tables, verdicts, recovery, timings),
PNG figures. OUT/protocol.json pins the config's result-affecting fields: rerunning into the same OUT with
a different protocol is refused, so finished jobs are never mixed with jobs of another protocol.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

from tpds_common.errors import JobFailed, UserError
from tpds_common.files import atomic_write_json
from tpds_common.log import get_logger, inherited_setup, setup_logging

from ..adapt.table import write_table
from ..engine.run_pool import run_pretraining
from . import stages
from .config import ReplicateConfig

log = get_logger("replicate")

RESULTS = "results"
PROTOCOL_FILE = "protocol.json"


class ProtocolMismatch(UserError, RuntimeError):
    """OUT holds results of another protocol: a new output directory (or the old config) fixes it."""


def check_protocol(cfg: ReplicateConfig, out: Path) -> None:
    body = json.loads(json.dumps(stages.protocol(cfg), default=str))
    path = out / PROTOCOL_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != body:
            diff = sorted(k for k in set(old) | set(body) if old.get(k) != body.get(k))
            raise ProtocolMismatch(
                f"{out} holds results of another protocol (differs in: {', '.join(diff)}); "
                "choose another --out, or delete it to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, body)


class Timer:
    """Wall seconds per stage, written with the results (where the time goes)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.monotonic()

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.monotonic() - self.t0

        return _Stage()


def replicate(
    cfg: ReplicateConfig,
    out: Path,
    *,
    workers: int | None = None,
    stages_to_run: set[str] | None = None,
    publish: Path | None = None,
) -> dict:
    """Run every stage (or `stages_to_run` of prep, backbone, pretrain, adapt, analyse) into `out`."""
    out = out.resolve()
    workers = workers or cfg.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    want = stages_to_run or {"prep", "backbone", "pretrain", "adapt", "analyse"}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_protocol(cfg, out)
    timer = Timer()
    started = time.monotonic()
    log.info(f"{cfg.source} -> {out} ({workers} workers x {threads} threads)")

    if "prep" in want:
        with timer("prep"):
            stages.prep_all(cfg, out)
    if not want - {"prep"}:
        return {"out": str(out), "timing": {"stages_s": timer.stages}, "summary": None}
    first = stages.data_dir(out, cfg.variants[0].name, max(cfg.prep.ks))
    cache = Path(cfg.cache).resolve() if cfg.cache else out / "cache"
    with timer("backbone"):
        backbones = train_backbones(cfg, first, cache, workers, "backbone" in want)
    searched, runs, pretrain_seconds = _pretrain_stage(cfg, out, want, backbones, workers, threads, timer)
    worlds = cfg.world_list()
    exports = {w.name: defaultdict(dict) for w in worlds}
    for w in worlds:
        for r in runs[w.name]:
            exports[w.name][r.variant][r.method.label] = r.export
    job_seconds: dict[str, float] = {}
    if "adapt" in want:
        from .pool import JobPool

        with timer("adapt"), JobPool(workers, threads) as pool:
            for variant in cfg.variants:
                job_seconds.update(_adapt_variant(cfg, out, variant, backbones, exports, searched, pool))
    stamp = out / "timings" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"

    def timing() -> dict:
        return _timing(timer, started, workers, threads, pretrain_seconds, job_seconds)

    atomic_write_json(stamp, timing())
    summary = None
    if "analyse" in want:
        with timer("analyse"):
            summary = analyse(cfg, out, backbones, exports, runs, searched)
        atomic_write_json(stamp, timing())
    log.info(
        f"finished in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timer.stages.items())
    )
    if summary is not None and publish is not None:
        publish_results(out / RESULTS, publish)
    return {"out": str(out), "timing": timing(), "summary": summary}


def _pretrain_stage(
    cfg: ReplicateConfig, out: Path, want: set[str], backbones: dict[str, Path], workers: int, threads: int, timer
) -> tuple[dict, dict, dict]:
    """The learning-rate searches (run, or read when the pretrain stage is not asked for), every world's
    pretraining runs and, with the pretrain stage, running them: (searched, {world: runs}, {run: seconds})."""
    worlds = cfg.world_list()
    searched = {}
    if cfg.pretrain.lr_search is not None and want & {"pretrain", "adapt", "analyse"}:
        with timer("pretrain"):
            if "pretrain" in want:
                searched = stages.search_pretraining_lrs(cfg, out, backbones[worlds[0].name], workers, threads)
            else:
                searched = _read_searches(cfg, out)
    runs = {w.name: stages.pretrain_runs(cfg, out, backbones[w.name], w, searched) for w in worlds}
    pretrain_seconds = {}
    if "pretrain" in want:
        with timer("pretrain"):
            for world in worlds:
                seconds = run_pretraining(
                    runs[world.name], stages.world_root(out, world) / "pretrain", workers, threads
                )
                pretrain_seconds.update({f"{world.name}/{k}" if world.name else k: v for k, v in seconds.items()})
    return searched, runs, pretrain_seconds


def _timing(
    timer: Timer, started: float, workers: int, threads: int, pretrain_seconds: dict, job_seconds: dict
) -> dict:
    """Where the time went so far (OUT/timings/<stamp>.json and the command's result)."""
    return {
        "stages_s": dict(timer.stages),
        "total_s": time.monotonic() - started,
        "workers": workers,
        "threads_per_worker": threads,
        "pretrain_runs_s": pretrain_seconds,
        "adaptation_jobs_run_now": len(job_seconds),
        "adaptation_job_mean_s": statistics.mean(job_seconds.values()) if job_seconds else None,
        "load_average": os.getloadavg(),
    }


def train_backbones(cfg: ReplicateConfig, data: Path, cache: Path, workers: int, train_now: bool) -> dict[str, Path]:
    """Every world's backbone (cached by its section, seed included): {world name: export}. Several to train
    train side by side in `workers` spawned processes, one thread each (the tiny backbone gains little from
    two, and two OpenMP threads collapse, spin-waiting, as soon as anything else shares the CPUs)."""
    from .backbone import train_backbone

    sections = {w.name: dataclasses.replace(cfg.backbone, seed=w.backbone_seed) for w in cfg.world_list()}
    if train_now and workers > 1 and len(sections) > 1:
        import multiprocessing as mp

        todo = [s for s in sections.values() if not backbone_cached(s, data, cache)]
        if len(todo) > 1:
            with mp.get_context("spawn").Pool(
                min(workers, len(todo)), initializer=_own_process_group, initargs=(inherited_setup(),)
            ) as pool:
                pool.starmap(_backbone_child, [(s, data, cache) for s in todo])
    return {name: train_backbone(s, data, cache, threads=1, train_now=train_now) for name, s in sections.items()}


def backbone_cached(section, data: Path, cache: Path) -> bool:
    from data_prep.manifest import read_manifest

    from .backbone import DONE_FILE, backbone_key

    tok = read_manifest(data).tokenizer
    return (
        cache / f"backbone-{backbone_key(section, tok.get('sha256', ''), int(tok['vocab_size']))}" / DONE_FILE
    ).is_file()


def _own_process_group(logging_setup: dict) -> None:
    """A backbone worker's first init_distributed makes its own one-rank group on a free port, whatever the
    parent's variables say; later backbones in the same worker reuse that group. A worker dies with the
    replication (SIGTERM from the kernel), so a killed run leaves no backbone training on; its checkpoint
    resumes next time. It logs as its parent was set up to (a spawned process starts unconfigured)."""
    from ..engine.stop import stop_when_parent_dies

    if logging_setup:
        setup_logging(**logging_setup)

    for var in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    stop_when_parent_dies(os.getppid())


def _backbone_child(section, data: Path, cache: Path) -> None:
    from .backbone import train_backbone

    train_backbone(section, data, cache, threads=1)


def _read_searches(cfg: ReplicateConfig, out: Path) -> dict[tuple[str, str], dict]:
    """The finished pretraining lr searches (for stages after pretrain): an unfinished one is an error."""
    from ..engine.lr_search import read_result

    found = {}
    for variant, m in stages.searched_methods(cfg):
        result = read_result(stages.search_dir(out, cfg, variant.name, m.label))
        if result is None:
            raise JobFailed(f"{variant.name}/{m.label}: its pretraining lr search has not run; run the pretrain stage")
        found[(variant.name, m.label)] = result
    return found


def _adapt_variant(
    cfg: ReplicateConfig, out: Path, variant, backbones: dict, exports: dict, searched: dict, pool
) -> dict:
    """Phase 1 in the first world (every lr for the search seeds, then the edge rule's extensions), phase 2 in
    every world (every seed at its row's chosen lr). Returns wall seconds per job run now."""
    worlds = cfg.world_list()
    table: dict[str, dict] = {}
    job_seconds: dict[str, float] = {}

    def run(rows: list[dict], phase: str) -> None:
        table.update({r["job"]["out_dir"]: r for r in rows})
        # the variant's job table (tensorpoly-ds report lists its missing rows): every job so far
        write_table(
            out / "adapt" / variant.name / "jobs.jsonl", [{**r, "row": i} for i, r in enumerate(table.values())]
        )
        report = pool.run(rows, desc=f"adapt {variant.name} ({phase})")
        job_seconds.update({rows[i]["job"]["out_dir"]: s for i, s in report.seconds.items()})
        if report.failed:
            raise JobFailed(
                f"{variant.name}: {len(report.failed)} adaptation jobs failed (their "
                "result.json holds the error); rerun to retry them"
            )

    w0 = worlds[0]
    extra: dict[tuple[str, int], list[float]] = {}
    while True:  # the edge rule: a row whose choice sits on the edge of the lrs it ran gets one more
        run(
            stages.adaptation_rows(
                cfg, out, variant, backbones[w0.name], exports[w0.name][variant.name], world=w0, extra_lrs=extra
            ),
            "search" if not extra else "search, edge rule",
        )
        selection = lr_selection(cfg, out, variant.name)
        grown = edge_extensions(selection, cfg.adapt.lrs, cfg.adapt.max_extensions)
        if all(set(v) <= set(extra.get(k, ())) for k, v in grown.items()):
            break
        extra = grown
    chosen = {(t["row"], t["k"]): t["chosen_lr"] for t in selection}
    if cfg.pretrain.sensitivity:
        run(stages.sensitivity_rows(cfg, out, variant, backbones[w0.name], searched, chosen), "sensitivity")
    for world in worlds:
        if world == w0 and cfg.search_seeds() == list(w0.seeds):
            continue  # every seed of the first world already ran every lr
        run(
            stages.adaptation_rows(
                cfg, out, variant, backbones[world.name], exports[world.name][variant.name], chosen, world=world
            ),
            f"chosen{', ' + world.name if world.name else ''}",
        )
    return job_seconds


def edge_extensions(
    selection: list[dict], grid: list[float], max_extensions: int
) -> dict[tuple[str, int], list[float]]:
    """{(row, k): the lrs beyond the configured grid that the edge rule asks for}: a row whose chosen lr is the
    smallest or largest it ran gets the next grid step past it, while it has fewer than `max_extensions`."""
    from ..engine.lr_search import beyond, edge_of

    out = {}
    for t in selection:
        ran = sorted(float(x) for x in t["lrs"])
        ext = [x for x in ran if x not in grid]
        edge = edge_of(t["chosen_lr"], ran)
        if edge is not None and len(ext) < max_extensions:
            ext = ext + [beyond(ran, edge)]
        if ext:
            out[(t["row"], t["k"])] = ext
    return out


def lr_selection(cfg: ReplicateConfig, out: Path, variant: str) -> list[dict]:
    """The selection table of the few-shot rows on the dev scores of the first world's search seeds (phase 1
    must be complete)."""
    from data_prep.manifest import read_manifest

    from .analysis import load_results, select_lr

    manifest = read_manifest(stages.data_dir(out, variant, max(cfg.prep.ks)))
    root = stages.world_root(out, cfg.world_list()[0]) / "adapt" / variant
    results, problems = load_results([root], int(manifest.extra["latent_skills"]["dev_examples"]))
    if problems:
        raise JobFailed(f"{variant}: {len(problems)} learning-rate search jobs are not complete; rerun")
    search = set(cfg.search_seeds())
    _, table = select_lr([r for r in results if r["k"] > 0 and r["seed"] in search], cfg.search_seeds())
    return table


def analyse(
    cfg: ReplicateConfig, out: Path, backbones: dict[str, Path], exports: dict, runs: dict, searched: dict
) -> dict:
    from data_prep.manifest import read_manifest

    from . import analysis
    from . import summary as summ
    from .backbone import DONE_FILE, loss_curve, plot_curves

    res = out / RESULTS
    res.mkdir(parents=True, exist_ok=True)
    worlds = cfg.world_list()
    w0 = worlds[0].name
    variants = {}
    for variant in cfg.variants:
        manifest = read_manifest(stages.data_dir(out, variant.name, max(cfg.prep.ks)))
        pretraining = pretraining_table(cfg, variant.name, runs, searched)
        variants[variant.name] = analysis.variant_analysis(
            cfg,
            variant.name,
            out,
            res,
            backbones[w0],
            exports[w0][variant.name],
            manifest,
            untrained=pretraining["did_not_train"],
        )
        curves = {
            r.method.label: loss_curve(r.run_dir)
            for r in runs[w0]
            if r.variant == variant.name and (r.run_dir / "metrics.jsonl").is_file()
        }
        if curves:
            plot_curves(
                curves,
                res / f"{variant.name}_pretrain_loss.png",
                f"{variant.name}: multi-task pretraining, {cfg.pretrain.steps} steps per method",
            )
            variants[variant.name]["figures"]["pretrain_loss"] = f"{variant.name}_pretrain_loss.png"
            variants[variant.name]["pretrain_final_val_loss"] = {
                k: (c["val"][-1][1] if c["val"] else None) for k, c in curves.items()
            }
        if cfg.pretrain.sensitivity:
            dev = int((manifest.extra.get("latent_skills") or {}).get("dev_examples", 0))
            pretraining["sensitivity"] = sensitivity_table(cfg, out, variant.name, searched, dev)
        if len(worlds) > 1 or searched:
            variants[variant.name]["pretraining"] = pretraining
    bb_root = backbones[w0].parent
    backbone_info = json.loads((bb_root / DONE_FILE).read_text())
    backbone_info["curve"] = json.loads((bb_root / "loss_curve.json").read_text())
    shutil.copyfile(bb_root / "loss_curve.png", res / "backbone_loss.png")
    body = {
        "config": stages.protocol(cfg),
        "config_file": cfg.source,
        "backbone": backbone_info,
        "variants": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in variants.items()},
        "timings": _timings(out),
    }
    if len(worlds) > 1:
        body["backbones"] = {w.name: json.loads((backbones[w.name].parent / DONE_FILE).read_text()) for w in worlds}
    atomic_write_json(res / "results.json", body)
    (res / "summary.md").write_text(summ.summary_markdown(cfg, body, variants))
    log.info(f"results in {res} (summary.md, results.json, figures)")
    return body


def sensitivity_table(cfg: ReplicateConfig, out: Path, variant: str, searched: dict, dev_examples: int) -> dict:
    """Per searched method: each module-lr candidate's final val loss and its mean dev accuracy after adaptation
    (pretrain.sensitivity), the candidate each rule chooses (ties: the smaller lr), and whether they agree."""
    from .analysis import load_results

    table = {}
    for (v, label), found in sorted(searched.items()):
        if v != variant:
            continue
        axis = found["axes"][0]
        rows = {}
        for value, loss in axis["losses"].items():
            lrs = stages.module_axis_lrs(cfg, cfg.method(label), found, float(value))
            tag = stages.sensitivity_dir(out, cfg, variant, label, lrs)
            results, _ = load_results([tag], dev_examples)
            dev = statistics.mean(r["dev"]["accuracy"] for r in results) if results else None
            rows[value] = {"val_loss": loss, "dev": dev, "jobs": len(results)}
        by_dev = [x for x in rows if rows[x]["dev"] is not None]
        dev_choice = max(sorted(by_dev, key=float), key=lambda x: rows[x]["dev"]) if by_dev else None
        table[label] = {
            "key": axis["key"],
            "candidates": rows,
            "chosen_by_val_loss": f"{axis['chosen']:g}",
            "chosen_by_dev": dev_choice,
            "agree": dev_choice == f"{axis['chosen']:g}",
        }
    return table


def pretraining_table(cfg: ReplicateConfig, variant: str, runs: dict, searched: dict) -> dict:
    """Per pretrained method: its recipe, the lrs its search chose (with the edge flags), its final multi-task
    val loss in every world and their mean; and the methods that did not train (pretrain.untrained_*)."""
    from ..engine.lr_search import final_val_loss

    methods = {}
    for world, world_runs in runs.items():
        for r in world_runs:
            if r.variant != variant:
                continue
            entry = methods.setdefault(r.method.label, {"recipe": cfg.method_pretrain(r.method), "val_loss": {}})
            entry["val_loss"][world] = final_val_loss(r.run_dir, missing_ok=True)
            found = searched.get((variant, r.method.label))
            if found is not None:
                entry["search"] = {"chosen": found["chosen"], "axes": found["axes"]}
    for entry in methods.values():
        losses = [x for x in entry["val_loss"].values() if x is not None]
        entry["mean_val_loss"] = statistics.mean(losses) if losses else None
    return {"methods": methods, "did_not_train": did_not_train(cfg, methods)}


def did_not_train(cfg: ReplicateConfig, methods: dict) -> dict[str, str]:
    """{label: why} for the methods whose mean val loss exceeds untrained_factor x their reference's: the
    task-blind reference for task-blind rows when one is set, else untrained_reference."""
    p = cfg.pretrain
    if p.untrained_reference is None or methods.get(p.untrained_reference, {}).get("mean_val_loss") is None:
        return {}
    untrained = {}
    for label, entry in methods.items():
        ref = p.untrained_reference
        if p.untrained_task_blind_reference is not None and cfg.task_blind(cfg.method(label)):
            ref = p.untrained_task_blind_reference
        ref_loss = methods.get(ref, {}).get("mean_val_loss")
        loss = entry["mean_val_loss"]
        if ref_loss is not None and (loss is None or loss > p.untrained_factor * ref_loss):
            untrained[label] = (
                f"mean multi-task val loss {loss if loss is None else round(loss, 3)} > "
                f"{p.untrained_factor:g} x {ref}'s {ref_loss:.3f}"
            )
    return untrained


def _timings(out: Path) -> dict:
    """Where the time went: the latest stage timings and the adaptation jobs' own breakdown by method."""
    runs = sorted((out / "timings").glob("*.json"))
    per_label: dict[str, list[dict]] = defaultdict(list)
    for p in (x for root in [out / "adapt", *(out / "worlds").glob("*/adapt")] for x in root.rglob("result.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r.get("status") == "complete":
            per_label[r["label"]].append(r.get("timings") or {})
    jobs = {
        label: {
            "jobs": len(ts),
            **{
                k: statistics.mean(t.get(k, 0.0) for t in ts)
                for k in ("total_s", "train_s", "eval_s", "setup_s", "data_s")
            },
        }
        for label, ts in sorted(per_label.items())
    }
    return {"stage_runs": [json.loads(p.read_text()) for p in runs[-5:]], "adaptation_by_method": jobs}


def publish_results(res: Path, dest: Path) -> None:
    """Copy the small result files (JSON, Markdown, PNG) into `dest` (e.g. benchmarks/results/replicate)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(res.iterdir()):
        if p.suffix in (".json", ".md", ".png"):
            shutil.copyfile(p, dest / p.name)
    log.info(f"published {res} -> {dest}")
