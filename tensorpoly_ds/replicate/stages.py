"""The stages before the analysis: prep, multi-task pretraining runs, the adaptation job list.

Layout under OUT (every stage skips what is already complete, so a rerun resumes):
    data/<variant>/k<k>/            prepared data (tensorpoly-ds prep), one directory per few-shot size
    pretrain/<variant>/<method>/    tensorpoly-ds pretrain run (run.yaml, metrics.jsonl, export/)
    adapt/<variant>/lr<lr>/jobs/<id>/          few-shot jobs (result.json + COMPLETE), id = label, mode, task, k, seed
    adapt/<variant>/zeroshot/mt<steps>/jobs/<id>/   zero-shot rows
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import yaml

from ..adapt.table import expand_grid
from ..adapters import AdapterConfig
from .config import FULLFT, MethodSpec, ReplicateConfig, Variant

REPO_ROOT = Path(__file__).resolve().parents[2]


def slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


# --- prep --------------------------------------------------------------------------------------------------

def data_dir(out: Path, variant: str, k: int) -> Path:
    return out / "data" / variant / f"k{k}"


def prep_all(cfg: ReplicateConfig, out: Path, log: Callable[[str], None] = print) -> None:
    """One prepared directory per (variant, k). Every directory uses the tokenizer built for the first
    variant's first directory, so that one backbone serves every variant (same vocabulary, same ids); the
    first variant's prompts must therefore contain every word of the others' (checked: no unknown word)."""
    from data_prep.pipeline import PrepConfig, build

    shared_tokenizer = None
    for variant in cfg.variants:
        for k in cfg.prep.ks:
            target = data_dir(out, variant.name, k)
            pc = PrepConfig(mixture=variant.mixture, source="embedded",
                            tokenizer=str(shared_tokenizer) if shared_tokenizer else "embedded", out=target,
                            num_shards=1, val_per_template=cfg.prep.val_per_template,
                            cap_per_template=cfg.prep.cap_per_template,
                            few_shot_seeds=tuple(cfg.prep.seeds), few_shot_k=k)
            result = build(pc, log=lambda msg: log(f"[prep] {msg}"))
            if shared_tokenizer is None:
                shared_tokenizer = target / "tokenizer"
            elif result.status == "built":
                check_no_unknown_words(target, variant.name, cfg.variants[0].name)


def check_no_unknown_words(directory: Path, variant: str, first: str) -> None:
    """Every token id of every prepared split is a known word (the shared tokenizer covers the variant)."""
    import numpy as np

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
            while hasattr(values, "flatten"):   # list<int> and list<list<int>> down to the ids
                values = values.flatten()
            ids = values.to_numpy(zero_copy_only=False)
            if (ids == unk).any():
                raise RuntimeError(f"{directory}: split {split!r} column {col!r} has {int((ids == unk).sum())} "
                                   f"unknown words: the shared tokenizer (of variant {first!r}) does not cover "
                                   f"variant {variant!r}; list the variant with the richest prompts first")


# --- multi-task pretraining ----------------------------------------------------------------------------------

@dataclass
class PretrainRun:
    variant: str
    method: MethodSpec
    run_dir: Path
    config: dict                 # the run config written to run_dir/run.yaml

    @property
    def export(self) -> Path:
        return self.run_dir / "export"

    def done(self) -> bool:
        return (self.export / "adapter_config.json").is_file()


def pretrain_runs(cfg: ReplicateConfig, out: Path, backbone: Path) -> list[PretrainRun]:
    runs = []
    p = cfg.pretrain
    for variant in cfg.variants:
        # the largest-k directory: its training split is the same in every k directory of the variant
        data = data_dir(out, variant.name, max(cfg.prep.ks))
        for m in cfg.methods_for(variant.name):
            if not m.is_pretrained():
                continue
            run_dir = out / "pretrain" / variant.name / slug(m.label)
            config = {
                "model": {"name_or_path": str(backbone)},
                "adapter": dict(m.adapter),
                "optim": {"name": p.optimizer, "module_lr": p.module_lr, "routing_lr": p.routing_lr,
                          "warmup_ratio": p.warmup_ratio, "schedule": "linear", "clip": 1.0},
                "train": {"steps": p.steps, "micro_batch": p.micro_batch, "grad_accum": 1,
                          "eval_every": p.eval_every, "save_every": p.eval_every, "seed": p.seed, "log_every": 50,
                          "keep_checkpoints": 1, "heatmap_max_layers": 2, "progress_bar": False},
                "data": {"dir": str(data), "val_max_samples": p.val_max_samples},
                "deepspeed": {"zero_stage": 0, "precision": "fp32"},
                "run": {"dir": str(run_dir)},
            }
            runs.append(PretrainRun(variant.name, m, run_dir, config))
    return runs


def _launch(run: PretrainRun, slot: int, threads: int, out: Path) -> tuple[subprocess.Popen, object]:
    from launch.sweep import job_env

    run.run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run.run_dir / "run.yaml"
    existing = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    if existing is not None and existing != run.config:
        raise RuntimeError(f"{cfg_path} holds a different run config than this replicate config; "
                           "use another --out (or delete the run directory) instead of mixing protocols")
    cfg_path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    fh = open(run.run_dir / "log.txt", "a")
    cmd = [sys.executable, "-m", "launch.pretrain", "--config", str(cfg_path), "--resume", "auto"]
    env = job_env(out / "pretrain", slot, threads)
    # the orchestrator built DeepSpeed's CPU op before (ensure_engine_ops): every run loads it from the same
    # cache instead of building its own copy per worker slot (a minute each)
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    else:
        env.pop("TORCH_EXTENSIONS_DIR", None)
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT), env=env,
                            start_new_session=True)
    return proc, fh


def ensure_engine_ops() -> None:
    """Create this process's (one-rank) process group: DeepSpeed builds or loads its CPU communication op
    into TORCH_EXTENSIONS_DIR once, before several runs would race to build it."""
    from ..engine.distributed import init_distributed

    init_distributed()


def run_pretraining(runs: list[PretrainRun], out: Path, workers: int, threads: int,
                    log: Callable[[str], None] = print) -> dict[str, float]:
    """Each run is `tensorpoly-ds pretrain` (DeepSpeed ZeRO-0, fp32, one process), `workers` at a time.
    Returns wall seconds per run that trained now."""
    pending = [r for r in runs if not r.done()]
    if pending:
        ensure_engine_ops()
    log(f"[pretrain] {len(runs)} runs: {len(runs) - len(pending)} done, {len(pending)} to train, {workers} at a time")
    running: dict[int, tuple[PretrainRun, subprocess.Popen, object, float]] = {}
    free = list(range(workers))[::-1]
    seconds: dict[str, float] = {}
    failed = []
    try:
        while pending or running:
            while pending and free:
                slot, run = free.pop(), pending.pop(0)
                proc, fh = _launch(run, slot, threads, out)
                running[slot] = (run, proc, fh, time.monotonic())
                log(f"[pretrain] {run.variant}/{run.method.label}: started (log {run.run_dir / 'log.txt'})")
            time.sleep(0.5)
            for slot, (run, proc, fh, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del running[slot]
                free.append(slot)
                seconds[f"{run.variant}/{run.method.label}"] = time.monotonic() - t0
                if proc.returncode == 0 and run.done():
                    log(f"[pretrain] {run.variant}/{run.method.label}: done in {time.monotonic() - t0:.0f} s")
                else:
                    failed.append(run)
                    log(f"[pretrain] {run.variant}/{run.method.label}: FAILED (exit {proc.returncode}), "
                        f"see {run.run_dir / 'log.txt'}")
    except KeyboardInterrupt:
        _stop(p for _, p, _, _ in running.values())
        raise
    if failed:
        raise RuntimeError(f"pretraining failed for {[f'{r.variant}/{r.method.label}' for r in failed]}")
    return seconds


def _stop(procs) -> None:
    import signal

    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)   # the engine checkpoints on SIGTERM: the rerun resumes
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


# --- the adaptation jobs ---------------------------------------------------------------------------------------

def _job_base(cfg: ReplicateConfig, backbone: Path) -> dict:
    a = cfg.adapt
    return {"model": str(backbone), "steps": a.steps, "batch_size": a.batch_size, "optimizer": a.optimizer,
            "warmup_ratio": a.warmup_ratio, "clip": a.clip, "eval_every": 0, "eval_batch_size": a.eval_batch_size,
            "length_norm": a.length_norm, "trainer": "local"}


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
        raise RuntimeError(f"adapt.tasks {cfg.adapt.tasks} names none of variant {variant!r}'s held-out tasks {held}")
    return tasks


def adaptation_rows(cfg: ReplicateConfig, out: Path, variant: Variant, backbone: Path, exports: dict[str, Path],
                    chosen_lr: dict[tuple[str, int], float] | None = None) -> list[dict]:
    """The jobs of one variant as job-table rows (tensorpoly_ds.adapt.table.expand_grid, so every job is
    validated now). Without `chosen_lr`: every lr of the grid for the search seeds (phase 1) and the zero-shot
    rows; with `chosen_lr` ({(row name, k): lr}, chosen on phase 1's dev scores): every seed at its row's
    chosen lr (phase 2; the search seeds' jobs are the same directories, already complete)."""
    from .analysis import row_name

    rows: list[dict] = []
    tasks = variant_tasks(cfg, out, variant.name)
    search = cfg.search_seeds()
    for lr in cfg.adapt.lrs:
        for m in cfg.methods_for(variant.name):
            for mode in cfg.modes_for(variant, m):
                for k in cfg.prep.ks:
                    if chosen_lr is None:
                        seeds = search
                    else:
                        name = row_name({"label": m.label, "mode": mode, "k": k, "job": {}})
                        if chosen_lr.get((name, k)) != lr:
                            continue
                        seeds = cfg.prep.seeds
                    grid = {"base": {**_job_base(cfg, backbone), "lr": lr,
                                     "routing_lr": lr * cfg.adapt.routing_lr_scale,
                                     "data_dir": str(data_dir(out, variant.name, k))},
                            "methods": [_entry(m, exports)], "modes": [mode], "tasks": tasks, "seeds": seeds,
                            "ks": [k]}
                    rows += expand_grid(grid, out / "adapt" / variant.name / lr_tag(lr))
    z = cfg.zero_shot
    if variant.name in z.variants and chosen_lr is None:
        for steps in z.multitask_steps:
            for label in z.methods:
                m = cfg.method(label)
                mode = "mu" if AdapterConfig.from_dict(m.adapter).routed else "full"   # mu = average the modules
                base = {**_job_base(cfg, backbone), "lr": z.lr, "routing_lr": z.lr * cfg.adapt.routing_lr_scale,
                        "multitask_steps": steps,
                        "multitask_batch_size": z.multitask_batch_size,
                        "data_dir": str(data_dir(out, variant.name, max(cfg.prep.ks)))}
                # without multi-task steps every seed gives the same numbers; kept so that rows pair up
                grid = {"base": base, "methods": [_entry(m, exports)], "modes": [mode], "tasks": tasks,
                        "seeds": cfg.prep.seeds, "ks": [0]}
                rows += expand_grid(grid, out / "adapt" / variant.name / "zeroshot" / f"mt{steps}")
    for i, r in enumerate(rows):
        r["row"] = i
    return rows


def protocol(cfg: ReplicateConfig) -> dict:
    """Everything in the config that changes a number: a rerun into the same OUT must match it."""
    body = asdict(cfg)
    for key in ("workers", "out", "cache", "source"):
        body.pop(key)
    return body
