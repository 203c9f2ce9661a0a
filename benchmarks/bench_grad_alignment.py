"""Cost of the gradient-alignment monitor (train.grad_alignment_every): seconds per probe next to seconds per
training step, in the same run, per adapter method.

Each row pretrains a T5 stand-in on the embedded mixture with the engine (one rank, ZeRO-0, fp32) with the
monitor on, and reads back from metrics.jsonl the step times (which never include the probe) and the probe
times. A probe runs one forward + backward per monitored task on its fixed batch, so its cost is about
(tasks x probe rows) / (micro batch x grad accum) training steps; the amortised overhead is probe / (every x
step).

Usage: python benchmarks/bench_grad_alignment.py [--quick] [--out benchmarks/results/grad_alignment.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tpds_common.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "lora": dict(method="lora", rank=1),
    "poly": dict(method="poly", rank=1, skills=8),
    "mhr": dict(method="mhr", rank=1, skills=8, heads=8),
    "tensorpoly_i": dict(method="tensorpoly_i", rank=4, tensor_rank=8, order=2),
}
SIZES = {  # T5 stand-ins (gated-GELU, like T0): tiny is the test model, small a larger CPU-sized one
    "tiny": dict(),
    "small": dict(d_model=256, d_kv=32, num_heads=8, d_ff=512, num_layers=4, num_decoder_layers=4),
}


def prepare(out: Path) -> Path:
    if not (out / "manifest.json").is_file():
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
                str(out),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    return out


def bench(
    method: str,
    size: str,
    data_dir: Path,
    run_dir: Path,
    *,
    steps: int,
    every: int,
    tasks: int,
    rows: int,
    micro: int,
    accum: int,
) -> dict:
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.adapters import AdapterConfig, inject_adapters
    from tensorpoly_ds.engine.config import DeepSpeedSection, OptimSection, TrainSection
    from tensorpoly_ds.engine.data import PreparedData
    from tensorpoly_ds.engine.trainer import Trainer
    from tensorpoly_ds.models import t5_config

    data = PreparedData.open(data_dir)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=data.vocab_size, **SIZES[size]))
    inject_adapters(model, AdapterConfig(**METHODS[method]), len(data.tasks))
    probed = data.tasks[:tasks]
    tr = TrainSection(
        steps=steps,
        micro_batch=micro,
        grad_accum=accum,
        eval_every=0,
        save_every=0,
        log_every=1,
        seed=0,
        progress_bar=False,
        save_checkpoints=False,
        export_at_end=False,
        eval_at_end=False,
        grad_alignment_every=every,
        grad_alignment_tasks=probed,
        grad_alignment_rows=rows,
    )
    Trainer(
        model,
        data.split("train"),
        run_dir=run_dir,
        tasks=data.tasks,
        train=tr,
        optim=OptimSection(name="adamw", module_lr=1e-3, routing_lr=1e-2),
        deepspeed=DeepSpeedSection(zero_stage=0, precision="fp32"),
    ).run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["perf/step_time_s"] for r in records if r["kind"] == "train" and r["step"] > 1)
    probes = [r["perf/grad_alignment_s"] for r in records if r["kind"] == "grad_alignment"]
    probe_s = statistics.median(probes[1:] if len(probes) > 1 else probes)  # the first one warms up
    return {
        "method": method,
        "size": size,
        "tasks": len(probed),
        "probe_rows": rows,
        "step_rows": micro * accum,
        "step_s": step_s,
        "probe_s": probe_s,
        "probe_per_step": probe_s / step_s,
        "overhead_at_every": every,
        "overhead": probe_s / (every * step_s),
        "probes": len(probes),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, fewer steps (a smoke run)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grad_alignment.json"))
    p.add_argument(
        "--data", default=None, help="a prepared data directory (default: the embedded mixture in a temp dir)"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tensorpoly_ds.engine import distributed as dist

    dist.init_distributed()
    sizes = ["tiny"] if args.quick else ["tiny", "small"]
    steps, every = (6, 2) if args.quick else (20, 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data) if args.data else prepare(Path(tmp) / "data")
        for size in sizes:
            for method in METHODS:
                rows.append(
                    bench(
                        method,
                        size,
                        data_dir,
                        Path(tmp) / f"{size}_{method}",
                        steps=steps,
                        every=every,
                        tasks=8,
                        rows=8,
                        micro=8,
                        accum=2,
                    )
                )
    head = (
        f"{'size':<6}{'method':<14}{'tasks':>6}{'rows':>6}{'step s':>9}{'probe s':>9}{'probe/step':>12}"
        f"{'overhead':>10}  (every {every} steps)"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['size']:<6}{r['method']:<14}{r['tasks']:>6}{r['probe_rows']:>6}{r['step_s']:>9.3f}"
            f"{r['probe_s']:>9.3f}{r['probe_per_step']:>11.2f}x{100 * r['overhead']:>9.1f}%"
        )
    out = Path(args.out)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "step_rows": "micro 8 x accum 2",
        "note": "rank 0, ZeRO-0, fp32; step times exclude the probe",
    }
    atomic_write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
