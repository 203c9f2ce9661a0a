"""Adapter health (train.adapter_health): what it costs, and what it shows about learning rates.

  cost  step time with the monitor on and off, side by side in one process: forward + backward of the tiny
        T5 of configs/pretrain/tiny_cpu.yaml on 16 rows of the embedded mixture, on and off interleaved step by
        step (whole engine runs alternated on this shared machine were ruled by its load: -18 % and +81 %);
        the median of each, per method.
  lr    the figure of docs/adapters.md "Adapter health": Poly, TensorPoly-I with the official frozen LayerNorm
        and TensorPoly-I with the output gain, each at module lr 1e-3 and 1e-2 (AdamW), ~150 steps; the
        mean delta ratio per step and the validation loss, plotted and written as JSON.

Usage: nice python benchmarks/bench_health.py cost [--out benchmarks/results/health/cost.json]
       nice python benchmarks/bench_health.py lr [--out-dir benchmarks/results/health]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_grad_alignment import prepare  # the embedded mixture, prepared once

from tpds_common.files import atomic_output, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "health"
COST_METHODS = {
    "poly": dict(method="poly", rank=1, skills=4),  # tiny_cpu.yaml's adapter
    "tensorpoly_i": dict(method="tensorpoly_i", rank=2, tensor_rank=8, order=2, layernorm=True),
}
LR_METHODS = {
    "poly": dict(method="poly", rank=1, skills=8),
    "tensorpoly_i_ln": dict(method="tensorpoly_i", rank=2, tensor_rank=8, order=2, layernorm=True),
    "tensorpoly_i_ln_gain": dict(
        method="tensorpoly_i", rank=2, tensor_rank=8, order=2, layernorm=True, output_gain=True
    ),
}
LRS = (1e-3, 1e-2)


def run(
    data,
    run_dir: Path,
    adapter: dict,
    *,
    steps: int,
    health: bool,
    module_lr: float = 1e-2,
    eval_every: int = 0,
    val_rows: int = 200,
) -> list[dict]:
    """One engine run from the same seeds; its metrics.jsonl records."""
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.adapters import AdapterConfig, inject_adapters
    from tensorpoly_ds.engine.config import DeepSpeedSection, OptimSection, TrainSection
    from tensorpoly_ds.engine.trainer import DataOptions, Trainer
    from tensorpoly_ds.models import t5_config

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=data.vocab_size))
    inject_adapters(model, AdapterConfig(**adapter), len(data.tasks))
    tr = TrainSection(
        steps=steps,
        micro_batch=8,
        grad_accum=2,
        eval_every=eval_every,
        save_every=0,
        log_every=10,
        seed=42,
        progress_bar=False,
        save_checkpoints=False,
        export_at_end=False,
        eval_at_end=bool(eval_every),
        heatmap_max_layers=0,
        adapter_health=health,
    )
    Trainer(
        model,
        data.split("train"),
        run_dir=run_dir,
        tasks=data.tasks,
        train=tr,
        val_rows=data.split("val") if eval_every else None,
        data=DataOptions(val_max_samples=val_rows),
        optim=OptimSection(name="adamw", module_lr=module_lr, routing_lr=0.1, warmup_ratio=0.06),
        deepspeed=DeepSpeedSection(zero_stage=0, precision="fp32"),
    ).run()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timed_step(model, batch, groups, layers, on: bool) -> float:
    """One forward + backward of the tiny T5 (the part of a training step the monitor touches), with the
    monitor's work when `on`: recording in the forward, gradient norms, the per-step reduction."""
    from tensorpoly_ds.adapters import health, task_routing
    from tensorpoly_ds.engine.trainer import lm_loss

    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with task_routing(batch["task_ids"]), health.recording(on):
        loss, _ = lm_loss(model, batch)
    loss.backward()
    if on:
        grads = health.grad_square_sums(groups, 0, "cpu")
        health.ratio_metrics(list(layers), health.take_sums(layers))
        health.grad_metrics(list(groups), grads)
    return time.perf_counter() - t0


def cost(data, pairs: int) -> dict:
    """Monitor on and off interleaved step by step (the order flips every pair), so that the load of a shared
    machine falls on both alike; medians over the pairs."""
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.adapters import AdapterConfig, adapter_layers, adapter_param_groups, inject_adapters
    from tensorpoly_ds.engine.data import collate
    from tensorpoly_ds.models import t5_config

    rows_in = data.split("train")
    batch = collate([rows_in[i] for i in range(16)])  # micro 8 x accum 2 of tiny_cpu.yaml in one pass
    rows = []
    for name, adapter in COST_METHODS.items():
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=data.vocab_size))
        inject_adapters(model, AdapterConfig(**adapter), len(data.tasks))
        model.train()
        groups = {k: v for k, v in adapter_param_groups(model).items() if v}
        layers = adapter_layers(model)
        for _ in range(3):  # warm-up
            timed_step(model, batch, groups, layers, True)
            timed_step(model, batch, groups, layers, False)
        times = {True: [], False: []}
        for i in range(pairs):
            for on in (True, False) if i % 2 == 0 else (False, True):
                times[on].append(timed_step(model, batch, groups, layers, on))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        rows.append(
            {
                "method": name,
                "adapter": adapter,
                "step_s_on": on,
                "step_s_off": off,
                "overhead": on / off - 1,
                "pairs": pairs,
                "adapted_layers": len(layers),
            }
        )
    head = f"{'method':<16}{'layers':>7}{'health on s':>13}{'health off s':>14}{'overhead':>10}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['method']:<16}{r['adapted_layers']:>7}{r['step_s_on']:>13.4f}{r['step_s_off']:>14.4f}"
            f"{100 * r['overhead']:>9.1f}%"
        )
    return {
        "rows": rows,
        "note": "median seconds of forward + backward of the tiny T5 on 16 rows of the embedded "
        "mixture (tiny_cpu.yaml's micro 8 x accum 2), with and without the monitor's "
        "work, interleaved; the optimizer step and DeepSpeed, which the monitor does not "
        "touch, are left out, so the relative overhead of a full step is smaller",
    }


def lr_sweep(data, tmp: Path, steps: int, eval_every: int) -> dict:
    curves = []
    for name, adapter in LR_METHODS.items():
        for lr in LRS:
            t0 = time.perf_counter()
            records = run(
                data, tmp / f"lr_{name}_{lr}", adapter, steps=steps, health=True, module_lr=lr, eval_every=eval_every
            )
            train_rows = [r for r in records if r["kind"] == "train"]
            curves.append(
                {
                    "method": name,
                    "adapter": adapter,
                    "module_lr": lr,
                    "seconds": time.perf_counter() - t0,
                    "steps": [r["step"] for r in train_rows],
                    "delta_ratio": [r["train/delta_ratio/mean"] for r in train_rows],
                    "grad_norm_modules": [r["train/adapter_grad_norm/modules"] for r in train_rows],
                    "train_loss": [r["train/loss"] for r in train_rows],
                    "val": {r["step"]: r["val/loss"] for r in records if r["kind"] == "eval" and "val/loss" in r},
                }
            )
            c = curves[-1]
            print(
                f"{name:<22} lr {lr:<7g} ratio step1 {c['delta_ratio'][0]:.3g} -> {c['delta_ratio'][-1]:.3g}, "
                f"val {min(c['val'].items())[1]:.3f} -> {c['val'][max(c['val'])]:.3f} ({c['seconds']:.0f} s)"
            )
    return {
        "curves": curves,
        "note": "tiny T5 on the embedded mixture, micro 8 x accum 2, AdamW, routing lr 0.1, "
        "warmup 6 %, linear decay; val loss on 200 validation rows",
    }


def plot(result: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"poly": "tab:blue", "tensorpoly_i_ln": "tab:red", "tensorpoly_i_ln_gain": "tab:green"}
    fig, (ax_r, ax_v) = plt.subplots(1, 2, figsize=(9, 3.4))
    for c in result["curves"]:
        style = "-" if c["module_lr"] == LRS[1] else "--"
        label = f"{c['method']} lr {c['module_lr']:g}"
        ax_r.plot(
            c["steps"], [max(v, 1e-6) for v in c["delta_ratio"]], style, color=colours[c["method"]], label=label, lw=1.2
        )
        steps = sorted(c["val"], key=int)
        ax_v.plot(
            [int(s) for s in steps], [c["val"][s] for s in steps], style + "o", color=colours[c["method"]], ms=3, lw=1.2
        )
    ax_r.set_yscale("log")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("|ΔW x| / |W0 x| (mean over layers)")
    ax_v.set_xlabel("step")
    ax_v.set_ylabel("validation loss")
    ax_r.legend(fontsize=6)
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def write_json(path: Path, body: dict) -> None:
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    atomic_write_text(path, json.dumps({"meta": meta, **body}, indent=2) + "\n")
    print(f"written {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("cost", "lr"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument(
        "--data", default=None, help="a prepared data directory (default: the embedded mixture in a temp dir)"
    )
    p.add_argument("--steps", type=int, default=150, help="lr: steps per run")
    p.add_argument("--pairs", type=int, default=40, help="cost: on/off pairs of steps per method")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tensorpoly_ds.engine import distributed as dist
    from tensorpoly_ds.engine.data import PreparedData

    dist.init_distributed()
    out_dir = Path(args.out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = PreparedData.open(Path(args.data) if args.data else prepare(Path(tmp) / "data"))
        if args.what == "cost":
            write_json(out_dir / "cost.json", cost(data, args.pairs))
        else:
            steps = args.steps
            result = lr_sweep(data, Path(tmp), steps, eval_every=max(1, steps // 6))
            write_json(out_dir / "lr.json", result)
            plot(result, out_dir / "lr.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
