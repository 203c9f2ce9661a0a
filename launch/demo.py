"""The demo: the whole pipeline on the embedded mixture, on this machine's CPUs.

  1. prep      the embedded mixture (16 training tasks, 3 held-out tasks) and its tokenizer
  2. backbone  full fine-tuning of a tiny T5 on the mixture: the stand-in for T0, which is itself a
               multi-task-trained T5 (adapters on a random frozen backbone would learn little)
  3. pretrain  each method's adapters on that frozen backbone, multi-task (DeepSpeed, ZeRO-0, fp32)
  4. sweep     few-shot adaptation: methods x modes x held-out tasks x seeds, P local workers
  5. report    Table 1 (median over seeds), parameter table, plots

Every stage is the real command (`tensorpoly-ds prep|pretrain|sweep|report`) and every stage is
resumable: rerunning the demo with the same --out skips what is finished.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"

# Adapter overrides on top of configs/pretrain/tiny_cpu.yaml (a tiny T5: d_model 64, 2+2 layers).
DEMO_METHODS: dict[str, dict] = {
    "lora": {"adapter.method": "lora", "adapter.rank": 4},
    "poly": {"adapter.method": "poly", "adapter.rank": 1, "adapter.skills": 4},
    "tensorpoly_i": {"adapter.method": "tensorpoly_i", "adapter.rank": 4, "adapter.tensor_rank": 4,
                     "adapter.order": 2},
    "tensorpoly_ii": {"adapter.method": "tensorpoly_ii", "adapter.rank": 4, "adapter.tensor_rank": 4,
                      "adapter.order": 2},
    "mhr": {"adapter.method": "mhr", "adapter.rank": 1, "adapter.skills": 4, "adapter.heads": 4},
    "tlora": {"adapter.method": "tlora", "adapter.rank": 4, "adapter.tensor_rank": 1, "adapter.order": 2},
    "ia3": {"adapter.method": "ia3"},
}
LABELS = {"lora": "LoRA", "poly": "Poly", "tensorpoly_i": "TensorPoly-I", "tensorpoly_ii": "TensorPoly-II",
          "mhr": "MHR", "tlora": "TLoRA", "ia3": "(IA)^3"}


def stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.monotonic()


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"demo: stage failed with exit status {done.returncode}: {' '.join(cmd)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorpoly-ds demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="everything goes below this folder (default: runs/demo)")
    p.add_argument("--methods", default="lora,poly,tensorpoly_i",
                   help=f"comma-separated, from: {', '.join(DEMO_METHODS)}")
    p.add_argument("--modes", default="full,z,mu", help="adaptation modes for routed methods")
    p.add_argument("--seeds", default="0,1024,42")
    p.add_argument("--backbone-steps", type=int, default=300, help="full fine-tuning steps of the tiny backbone")
    p.add_argument("--pretrain-steps", type=int, default=200, help="multi-task adapter steps per method")
    p.add_argument("--adapt-steps", type=int, default=100, help="few-shot steps per job")
    p.add_argument("--workers", type=int, default=2, help="concurrent adaptation jobs")
    p.add_argument("--quick", action="store_true", help="one seed, 60 pretraining and 20 adaptation steps")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        print(f"tensorpoly-ds demo: unknown method(s) {unknown}; valid: {', '.join(DEMO_METHODS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.seeds, args.backbone_steps, args.pretrain_steps, args.adapt_steps = "0", 150, 60, 40
    out = Path(args.out).resolve()
    data_dir, report_dir, sweep_dir = out / "data", out / "report", out / "sweep"
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    py = sys.executable
    started = time.monotonic()

    t = stage("1/5 prep: the embedded mixture")
    run([py, "-m", "data_prep", "--mixture", "embedded", "--source", "embedded", "--tokenizer", "embedded",
         "--out", str(data_dir)], env)
    print(f"prep: {time.monotonic() - t:.0f} s")

    t = stage(f"2/5 backbone: full fine-tuning of a tiny T5 on the mixture, {args.backbone_steps} steps")
    backbone = out / "backbone" / "export"
    if (backbone / "config.json").is_file():
        print(f"backbone: {backbone} exists, skipped")
    else:
        run([py, "-m", "launch.pretrain", "--config", str(TINY_CONFIG), f"data.dir={data_dir}",
             f"run.dir={backbone.parent}", "adapter=null", "train.full_finetune=true", "optim.lr=3e-3",
             f"train.steps={args.backbone_steps}", "train.progress_bar=false"], env)
        print(f"backbone: {time.monotonic() - t:.0f} s")

    exports: dict[str, Path] = {}
    for method in methods:
        t = stage(f"3/5 pretrain: {LABELS[method]} adapters on the frozen backbone, {args.pretrain_steps} steps")
        run_dir = out / "pretrain" / method
        exports[method] = run_dir / "export"
        if (exports[method] / "adapter_config.json").is_file():
            print(f"pretrain: {run_dir} already has an export, skipped")
            continue
        overrides = [f"{k}={v}" for k, v in DEMO_METHODS[method].items()]
        run([py, "-m", "launch.pretrain", "--config", str(TINY_CONFIG), f"data.dir={data_dir}", f"run.dir={run_dir}",
             f"model.name_or_path={backbone}", f"train.steps={args.pretrain_steps}", "train.progress_bar=false",
             *overrides], env)
        print(f"pretrain {method}: {time.monotonic() - t:.0f} s")

    t = stage("4/5 sweep: few-shot adaptation per method, mode, held-out task and seed")
    grid = {
        "base": {"data_dir": str(data_dir), "model": str(backbone), "steps": args.adapt_steps, "batch_size": 8,
                 "eval_every": args.adapt_steps, "optimizer": "adamw", "lr": 1e-2},
        "methods": [{"label": LABELS[m], "export": str(exports[m])} for m in methods],
        "modes": [m.strip() for m in args.modes.split(",") if m.strip()],
        "tasks": "held_out",
        "seeds": [int(s) for s in args.seeds.split(",")],
        "ks": [None],
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    grid_file = out / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid, sort_keys=False))
    run([py, "-m", "launch.sweep", "--grid", str(grid_file), "--out", str(sweep_dir), "--workers", str(args.workers)],
        env)
    print(f"sweep: {time.monotonic() - t:.0f} s")

    t = stage("5/5 report")
    run([py, "-m", "launch.report", str(sweep_dir), "--out", str(report_dir)], env)
    table = report_dir / "table1.md"
    if table.is_file():
        print("\n" + table.read_text())
    print(f"demo finished in {time.monotonic() - started:.0f} s; report in {report_dir} "
          f"(report.md, table1.csv, params.md, accuracy.png, routing_*.png); "
          f"TensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
