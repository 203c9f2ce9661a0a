"""Step time of the training loop, old tree vs new tree, side by side (issue #17, "one training loop").

Workloads, each in its own fresh subprocess whose PYTHONPATH (and cwd) is the tree under test, which also
reports its peak resident memory (ru_maxrss: imports, model, optimizer and data together):
  pretrain      engine Trainer in-process: tiny T5 + Poly (configs/pretrain/tiny_cpu.yaml's model, adapter,
                batch 8 x 2), ZeRO 0, one rank, STEPS steps, no evaluation or checkpoint; the time between
                consecutive on_step calls (the whole loop iteration, logging included), first 3 steps dropped
  adapt-local   an in-process adaptation job (run_job) on the local backend: Poly export, mode full, 4 shots,
  adapt-engine  the same job on the engine backend (DeepSpeed ZeRO 0, one rank); for both: train_s / steps
                from result.json (training time without evaluation, trainer start-up included) and the
                job's wall time
Rounds interleave the trees (the order flips every round) so that the machine's load falls on both alike; the
table gives medians over rounds and their min-max, and new/old ratios of the medians.

Usage: python benchmarks/bench_loop.py --old /path/to/old/tree [--new .] [--rounds 5]
       [--out benchmarks/results/loop/bench_loop.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loop_equivalence import tree_env  # this directory: the environment that runs one tree

HERE = Path(__file__).resolve()
PRETRAIN_STEPS = 40
ADAPT = dict(
    steps=40,
    batch_size=4,
    eval_every=0,
    eval_batch_size=8,
    max_eval_examples=8,
    seed=42,
    mode="full",
    warmup_ratio=0.06,
)
WARMUP_STEPS = 3


def time_pretrain(data_dir: Path, work: Path) -> dict:
    import torch
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.adapters import AdapterConfig, inject_adapters
    from tensorpoly_ds.engine import trainer as engine_trainer
    from tensorpoly_ds.engine.config import DeepSpeedSection, OptimSection, TrainSection
    from tensorpoly_ds.engine.data import PreparedData
    from tensorpoly_ds.engine.trainer import TrainHooks
    from tensorpoly_ds.models import t5_config

    data = PreparedData.open(data_dir)
    torch.manual_seed(42)
    model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=data.vocab_size))
    inject_adapters(model, AdapterConfig(method="poly", rank=1, skills=4), len(data.tasks))
    stamps: list[float] = []
    tr = TrainSection(
        steps=PRETRAIN_STEPS,
        micro_batch=8,
        grad_accum=2,
        eval_every=0,
        save_every=0,
        log_every=10,
        seed=42,
        progress_bar=False,
        save_checkpoints=False,
        export_at_end=False,
        eval_at_end=False,
        heatmap_max_layers=0,
    )
    t0 = time.perf_counter()
    kwargs = dict(
        run_dir=work / "pretrain",
        tasks=data.tasks,
        train=tr,
        optim=OptimSection(name="adamw", module_lr=1e-2, routing_lr=0.1, warmup_ratio=0.06, clip=1.0),
        deepspeed=DeepSpeedSection(zero_stage=0, precision="fp32"),
        hooks=TrainHooks(on_step=lambda step, metrics: stamps.append(time.perf_counter())),
    )
    if hasattr(engine_trainer, "Trainer"):  # trees since the loop refactor: one object, run(resume)
        engine_trainer.Trainer(model, data.split("train"), **kwargs).run()
    else:  # older trees: the keyword function train()
        engine_trainer.train(model, data.split("train"), **kwargs)
    steps = [b - a for a, b in zip(stamps[WARMUP_STEPS - 1 :], stamps[WARMUP_STEPS:])]
    return {"step_s": statistics.median(steps), "run_s": time.perf_counter() - t0}


def time_adapt(data_dir: Path, export: Path, work: Path, trainer: str) -> dict:
    from data_prep.manifest import read_manifest
    from tensorpoly_ds.adapt.job import AdaptJob, run_job

    job = AdaptJob(
        out_dir=str(work / f"adapt_{trainer}"),
        data_dir=str(data_dir),
        export=str(export),
        task=read_manifest(data_dir).held_out[0],
        trainer=trainer,
        **ADAPT,
    )
    t0 = time.perf_counter()
    # older trees take a log callable; newer ones log through the project logger
    quiet = {"log": lambda s: None} if "log" in inspect.signature(run_job).parameters else {}
    result = run_job(job, **quiet)
    return {"step_s": result["timings"]["train_s"] / ADAPT["steps"], "run_s": time.perf_counter() - t0}


def make_export(data_dir: Path, out: Path) -> Path:
    """A Poly export on the tiny backbone the jobs build (random non-zero adapters; only timing matters)."""
    import torch

    from data_prep.manifest import read_manifest
    from tensorpoly_ds.adapt.job import AdaptJob, build_backbone
    from tensorpoly_ds.adapters import AdapterConfig, export_adapters, inject_adapters

    m = read_manifest(data_dir)
    model = build_backbone(
        AdaptJob(out_dir="unused", data_dir=str(data_dir), task=m.held_out[0], export="x"), m.tokenizer["vocab_size"]
    )
    inject_adapters(model, AdapterConfig(method="poly", rank=1, skills=4), num_tasks=len(m.tasks))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    export_adapters(model, out, m.tasks)
    return out


WORKLOADS = ("pretrain", "adapt-local", "adapt-engine")


def worker(workload: str, data_dir: Path, export: Path, work: Path) -> dict:
    """One workload in this process; its peak resident memory is the process's (imports included)."""
    import resource

    if workload == "pretrain":
        out = time_pretrain(data_dir, work)
    else:
        out = time_adapt(data_dir, export, work, workload.removeprefix("adapt-"))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return out


def one_round(tree: Path, data_dir: Path, export: Path, work: Path) -> dict:
    """Each workload in its own process, so that each has its own peak memory."""
    out = {}
    for workload in WORKLOADS:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        argv = [sys.executable, str(HERE), "--worker", workload, "--data", str(data_dir), "--export", str(export)]
        proc = subprocess.run(
            [*argv, "--work", str(work)], cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"{tree}: {workload} worker exited {proc.returncode}\n{proc.stderr[-5000:]}")
        out[workload] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def summary(rounds: list[dict]) -> dict:
    out = {}
    for workload in rounds[0]["old"]:
        row = {}
        for side in ("old", "new"):
            for what in ("step_s", "run_s", "peak_rss_mb"):
                values = [r[side][workload][what] for r in rounds if what in r[side][workload]]
                if not values:  # results written before peak memory was measured
                    continue
                row[f"{side}_{what}"] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        row["ratio_step"] = row["new_step_s"]["median"] / row["old_step_s"]["median"]
        row["ratio_run"] = row["new_run_s"]["median"] / row["old_run_s"]["median"]
        if "new_peak_rss_mb" in row:
            row["ratio_peak_rss"] = row["new_peak_rss_mb"]["median"] / row["old_peak_rss_mb"]["median"]
        out[workload] = row
    return out


def table(rows: dict) -> str:
    lines = [
        (
            "| workload | old step ms (min-max) | new step ms (min-max) | new/old step | old run s | new run s "
            "| new/old run | old peak MB | new peak MB | new/old peak |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(stat: dict) -> str:
        return f"{1e3 * stat['median']:.1f} ({1e3 * stat['min']:.1f}-{1e3 * stat['max']:.1f})"

    for name, r in rows.items():
        peak = (
            f"{r['old_peak_rss_mb']['median']:.0f} | {r['new_peak_rss_mb']['median']:.0f} | {r['ratio_peak_rss']:.3f}"
            if "ratio_peak_rss" in r
            else "- | - | -"
        )
        lines.append(
            f"| {name} | {ms(r['old_step_s'])} | {ms(r['new_step_s'])} | {r['ratio_step']:.3f} "
            f"| {r['old_run_s']['median']:.2f} | {r['new_run_s']['median']:.2f} | {r['ratio_run']:.3f} | {peak} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path)
    ap.add_argument("--new", type=Path, default=HERE.parents[1])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "loop" / "bench_loop.json")
    ap.add_argument("--worker", choices=WORKLOADS, help="(internal) run one workload in this process")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--export", type=Path)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.export, args.work)))
        return
    if args.old is None:
        ap.error("--old TREE is required")
    from tpds_common.files import atomic_write_json

    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep",
                "--mixture",
                "embedded",
                "--source",
                "embedded",
                "--tokenizer",
                "embedded",
                "--out",
                str(data_dir),
                "--few-shot-k",
                "4",
            ],
            cwd=trees["new"],
            env=tree_env(trees["new"]),
            check=True,
            capture_output=True,
        )
        export = make_export(data_dir, tmp / "export")
        rounds = []
        for i in range(args.rounds):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            rounds.append({side: one_round(trees[side], data_dir, export, tmp / side) for side in order})
            print(
                f"round {i + 1}/{args.rounds}: "
                + ", ".join(
                    f"{side} {w} {1e3 * v['step_s']:.1f} ms" for side in order for w, v in rounds[-1][side].items()
                ),
                flush=True,
            )
    rows = summary(rounds)
    print(table(rows))
    report = {
        "trees": {k: str(v) for k, v in trees.items()},
        "rounds": rounds,
        "summary": rows,
        "pretrain_steps": PRETRAIN_STEPS,
        "adapt_job": ADAPT,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "finished": time.time(),
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        sys.path.insert(0, str(HERE.parents[1]))
    else:
        sys.path.insert(0, os.getcwd())  # the tree under test (cwd), before this script's own tree
    main()
