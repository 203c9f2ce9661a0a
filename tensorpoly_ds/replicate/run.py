"""`tensorpoly-ds replicate`: the whole grid from one committed config, resumable stage by stage.

    prep -> backbone (T5-LM analogue, cached) -> multi-task pretraining of every method -> few-shot and
    zero-shot adaptation jobs (in-process worker pool) -> tables, verdicts, routing recovery, plots

Outputs under OUT/results/: results.json (everything), summary.md (tables, verdicts, recovery, timings),
PNG figures. OUT/protocol.json pins the config's result-affecting fields: rerunning into the same OUT with
a different protocol is refused, so finished jobs are never mixed with jobs of another protocol.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ..adapt.job import write_json
from ..adapt.table import write_table
from . import stages
from .config import ReplicateConfig

RESULTS = "results"
PROTOCOL_FILE = "protocol.json"


class ProtocolMismatch(RuntimeError):
    pass


def check_protocol(cfg: ReplicateConfig, out: Path) -> None:
    body = json.loads(json.dumps(stages.protocol(cfg), default=str))
    path = out / PROTOCOL_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != body:
            diff = sorted(k for k in set(old) | set(body) if old.get(k) != body.get(k))
            raise ProtocolMismatch(f"{out} holds results of another protocol (differs in: {', '.join(diff)}); "
                                   "choose another --out, or delete it to start over")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, body)


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


def replicate(cfg: ReplicateConfig, out: Path, *, workers: int | None = None, stages_to_run: set[str] | None = None,
              publish: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every stage (or `stages_to_run` of prep, backbone, pretrain, adapt, analyse) into `out`."""
    from .backbone import train_backbone

    out = out.resolve()
    workers = workers or cfg.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    want = stages_to_run or {"prep", "backbone", "pretrain", "adapt", "analyse"}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_protocol(cfg, out)
    timer = Timer()
    started = time.monotonic()
    log(f"[replicate] {cfg.source} -> {out} ({workers} workers x {threads} threads)")

    if "prep" in want:
        with timer("prep"):
            stages.prep_all(cfg, out, log)
    if not want - {"prep"}:
        return {"out": str(out), "timing": {"stages_s": timer.stages}, "summary": None}
    first = stages.data_dir(out, cfg.variants[0].name, max(cfg.prep.ks))
    cache = Path(cfg.cache).resolve() if cfg.cache else out / "cache"
    with timer("backbone"):
        # one thread: the tiny backbone gains little from two, and two OpenMP threads collapse (spin-waiting
        # barriers) as soon as anything else shares the CPUs
        backbone = train_backbone(cfg.backbone, first, cache, threads=1, log=log,
                                  train_now="backbone" in want)
    runs = stages.pretrain_runs(cfg, out, backbone)
    pretrain_seconds = {}
    if "pretrain" in want:
        with timer("pretrain"):
            pretrain_seconds = stages.run_pretraining(runs, out, workers, threads, log)
    exports = defaultdict(dict)
    for r in runs:
        exports[r.variant][r.method.label] = r.export
    job_seconds: dict[str, float] = {}
    if "adapt" in want:
        from .pool import JobPool

        with timer("adapt"), JobPool(workers, threads) as pool:
            for variant in cfg.variants:
                table: dict[str, dict] = {}
                for phase in ("search", "chosen"):
                    if phase == "chosen" and cfg.search_seeds() == list(cfg.prep.seeds):
                        break   # every seed already ran every lr
                    chosen = None if phase == "search" else chosen_lrs(cfg, out, variant.name)
                    rows = stages.adaptation_rows(cfg, out, variant, backbone, exports[variant.name], chosen)
                    table.update({r["job"]["out_dir"]: r for r in rows})
                    # the variant's job table (tensorpoly-ds report lists its missing rows): every job so far
                    write_table(out / "adapt" / variant.name / "jobs.jsonl",
                                [{**r, "row": i} for i, r in enumerate(table.values())])
                    report = pool.run(rows, desc=f"adapt {variant.name} ({phase})", log=log)
                    job_seconds.update({rows[i]["job"]["out_dir"]: s for i, s in report.seconds.items()})
                    if report.failed:
                        raise RuntimeError(f"{variant.name}: {len(report.failed)} adaptation jobs failed (their "
                                           "result.json holds the error); rerun to retry them")
    stamp = out / "timings" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"

    def timing() -> dict:
        return {"stages_s": dict(timer.stages), "total_s": time.monotonic() - started, "workers": workers,
                "threads_per_worker": threads, "pretrain_runs_s": pretrain_seconds,
                "adaptation_jobs_run_now": len(job_seconds),
                "adaptation_job_mean_s": statistics.mean(job_seconds.values()) if job_seconds else None,
                "load_average": os.getloadavg()}

    write_json(stamp, timing())
    summary = None
    if "analyse" in want:
        with timer("analyse"):
            summary = analyse(cfg, out, backbone, exports, runs, log)
        write_json(stamp, timing())
    log(f"[replicate] finished in {time.monotonic() - started:.0f} s: " +
        ", ".join(f"{k} {v:.0f} s" for k, v in timer.stages.items()))
    if summary is not None and publish is not None:
        publish_results(out / RESULTS, publish, log)
    return {"out": str(out), "timing": timing(), "summary": summary}


def chosen_lrs(cfg: ReplicateConfig, out: Path, variant: str) -> dict[tuple[str, int], float]:
    """{(row name, k): lr} chosen on the dev scores of the search seeds' jobs (phase 1 must be complete)."""
    from data_prep.manifest import read_manifest

    from .analysis import load_results, select_lr

    manifest = read_manifest(stages.data_dir(out, variant, max(cfg.prep.ks)))
    results, problems = load_results([out / "adapt" / variant], int(manifest.extra["latent_skills"]["dev_examples"]))
    if problems:
        raise RuntimeError(f"{variant}: {len(problems)} learning-rate search jobs are not complete; rerun")
    _, table = select_lr([r for r in results if r["k"] > 0], cfg.search_seeds())
    return {(t["row"], t["k"]): t["chosen_lr"] for t in table}


def analyse(cfg: ReplicateConfig, out: Path, backbone: Path, exports: dict, runs: list, log) -> dict:
    from data_prep.manifest import read_manifest

    from . import analysis, summary as summ
    from .backbone import DONE_FILE, loss_curve, plot_curves

    res = out / RESULTS
    res.mkdir(parents=True, exist_ok=True)
    variants = {}
    for variant in cfg.variants:
        manifest = read_manifest(stages.data_dir(out, variant.name, max(cfg.prep.ks)))
        variants[variant.name] = analysis.variant_analysis(cfg, variant.name, out, res, backbone,
                                                           exports[variant.name], manifest, log)
        curves = {r.method.label: loss_curve(r.run_dir) for r in runs
                  if r.variant == variant.name and (r.run_dir / "metrics.jsonl").is_file()}
        if curves:
            plot_curves(curves, res / f"{variant.name}_pretrain_loss.png",
                        f"{variant.name}: multi-task pretraining, {cfg.pretrain.steps} steps per method")
            variants[variant.name]["figures"]["pretrain_loss"] = f"{variant.name}_pretrain_loss.png"
            variants[variant.name]["pretrain_final_val_loss"] = {k: (c["val"][-1][1] if c["val"] else None)
                                                                 for k, c in curves.items()}
    bb_root = backbone.parent
    backbone_info = json.loads((bb_root / DONE_FILE).read_text())
    backbone_info["curve"] = json.loads((bb_root / "loss_curve.json").read_text())
    shutil.copyfile(bb_root / "loss_curve.png", res / "backbone_loss.png")
    body = {"config": stages.protocol(cfg), "config_file": cfg.source, "backbone": backbone_info,
            "variants": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in variants.items()},
            "timings": _timings(out)}
    write_json(res / "results.json", body)
    (res / "summary.md").write_text(summ.summary_markdown(cfg, body, variants))
    log(f"[replicate] results in {res} (summary.md, results.json, figures)")
    return body


def _timings(out: Path) -> dict:
    """Where the time went: the latest stage timings and the adaptation jobs' own breakdown by method."""
    runs = sorted((out / "timings").glob("*.json"))
    per_label: dict[str, list[dict]] = defaultdict(list)
    for p in (out / "adapt").rglob("result.json"):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r.get("status") == "complete":
            per_label[r["label"]].append(r.get("timings") or {})
    jobs = {label: {"jobs": len(ts), **{k: statistics.mean(t.get(k, 0.0) for t in ts)
                                        for k in ("total_s", "train_s", "eval_s", "setup_s", "data_s")}}
            for label, ts in sorted(per_label.items())}
    return {"stage_runs": [json.loads(p.read_text()) for p in runs[-5:]], "adaptation_by_method": jobs}


def publish_results(res: Path, dest: Path, log) -> None:
    """Copy the small result files (JSON, Markdown, PNG) into `dest` (e.g. benchmarks/results/replicate)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(res.iterdir()):
        if p.suffix in (".json", ".md", ".png"):
            shutil.copyfile(p, dest / p.name)
    log(f"[replicate] published {res} -> {dest}")
