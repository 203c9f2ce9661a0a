"""Random vs length-grouped batching (data.batching): padding, useful tokens/s, and the validation loss at
equal steps.

Part `speed` (no data needed). The rows are synthetic, with a P3-shaped length distribution that we made up
(no P3 download or length statistics are available here) from what P3 is: a mixture of many tasks (prompt
templates) whose inputs differ in length by task, short classification prompts next to passage-level QA and
summarisation. 64 tasks, equal shares; task t's inputs are log-normal with median m_t and sigma 0.45, where
m_t itself is log-normal around 130 tokens (sigma 0.6): overall median ~134 tokens, 90th percentile ~340,
19 % of rows at a 256 cap, 0.08 % at a 1024 cap. Targets are short (answer words) with a long tail: task median log-normal around 4 tokens
(sigma 0.9), within-task sigma 0.5. Lengths are truncated at the input cap as data_prep and the engine do:
256 (data_prep's default and configs/pretrain/base_t0_3b.yaml's data.max_input_len) and 1024 (the T0
paper's input cap), targets at 256. Token ids are random.

For each cap it reports (1) the padding fraction, input + target slots that are padding, over a whole epoch
of 16,384 rows, for random order and for length-grouped order at several group sizes, and (2) useful
(non-pad, input + target) tokens/s of training steps of a T5 with d_model 256 (4+4 layers, 8 heads, d_ff
1024, gated-GELU, T0's 32,128-word vocabulary) with Poly adapters (8 skills, rank 1; frozen backbone, AdamW
on the adapters), micro-batch 8 x accum 2. The timed steps are the first `group_size` steps of the epoch in
both orders: they hold exactly the same rows, so the useful tokens are equal and the ratio is a time ratio.
The two orders alternate step by step (random first on even steps) in one process, one thread.

Part `loss`. Real prepared data (the embedded mixture of data_prep unless --data is given): `tensorpoly-ds
pretrain` with configs/pretrain/tiny_cpu.yaml (tiny T5, Poly adapters, 200 steps of 16 rows, validation on
400 rows) for each seed and both batchings; the final multi-task validation loss per run, mean and spread.

Usage: python benchmarks/bench_batching.py [--quick] [--part speed|loss|all] [--seeds 0 1 2]
       [--out benchmarks/results/batching.json]
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
import time
from pathlib import Path

import numpy as np
import torch

from tensorpoly_ds.engine.data import TrainStream, _rows, collate
from tpds_common.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
VOCAB = 32128
ARCH = dict(d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_layers=4, num_decoder_layers=4)


# ---- the synthetic P3-shaped rows ---------------------------------------------------------------------------
class Rows:
    """Rows with the engine's columns, materialised on access (ds[list] -> columns), lengths fixed up front."""

    column_names = ["task_id", "input_ids", "target_ids"]

    def __init__(self, n: int, cap: int, seed: int = 0, tasks: int = 64):
        rng = np.random.default_rng(seed)
        in_median = np.exp(rng.normal(np.log(130), 0.6, tasks))
        out_median = np.exp(rng.normal(np.log(4), 0.9, tasks))
        self.task = rng.integers(0, tasks, n)
        self.inp = np.clip(rng.lognormal(np.log(in_median[self.task]), 0.45).astype(int), 4, cap)
        self.tgt = np.clip(rng.lognormal(np.log(out_median[self.task]), 0.5).astype(int), 1, 256)
        self.ids = np.random.default_rng(seed + 1)

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, idx):
        return {
            "task_id": [int(self.task[i]) for i in idx],
            "input_ids": [self.ids.integers(2, VOCAB, self.inp[i]).tolist() for i in idx],
            "target_ids": [self.ids.integers(2, VOCAB, self.tgt[i]).tolist() for i in idx],
        }

    def describe(self) -> dict:
        return {
            "rows": len(self),
            "input_median": float(np.median(self.inp)),
            "input_p90": float(np.percentile(self.inp, 90)),
            "input_max": int(self.inp.max()),
            "input_share_at_cap": float(np.mean(self.inp == self.inp.max())),
            "target_median": float(np.median(self.tgt)),
            "target_p99": float(np.percentile(self.tgt, 99)),
        }


def stream(rows, batching: str, group_size: int, micro: int, accum: int, seed: int = 0) -> TrainStream:
    return TrainStream(rows, seed=seed, micro_batch=micro, grad_accum=accum, batching=batching, group_size=group_size)


def padding(rows: Rows, s: TrainStream, steps: int) -> dict:
    """Padding fractions of the micro-batches of `steps` steps, from the lengths alone."""
    useful = {"input": 0, "target": 0}
    slots = {"input": 0, "target": 0}
    for _ in range(steps):
        for mb in s.step_indices():
            for key, lengths in (("input", rows.inp[mb]), ("target", rows.tgt[mb])):
                useful[key] += int(lengths.sum())
                slots[key] += len(mb) * int(lengths.max())
    out = {f"{k}_padding": 1 - useful[k] / slots[k] for k in useful}
    out["padding"] = 1 - sum(useful.values()) / sum(slots.values())
    return out


# ---- timed training steps --------------------------------------------------------------------------------
def build_model(tasks: int):
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.adapters import AdapterConfig
    from tensorpoly_ds.engine.model import prepare_model
    from tensorpoly_ds.models import t5_config

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=VOCAB, **ARCH))
    for p in model.parameters():
        p.requires_grad_(False)
    model = prepare_model(
        model, AdapterConfig(method="poly", skills=8, rank=1), tasks, full_finetune=False, zero_stage=0
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def train_step(model, opt, micro_batches) -> tuple[float, int]:
    """Seconds of one optimizer step over the micro-batches, and its useful tokens."""
    from tensorpoly_ds.adapters import task_routing
    from tensorpoly_ds.engine.trainer import _tokens, lm_loss

    start = time.perf_counter()
    for batch in micro_batches:
        with task_routing(batch["task_ids"]):
            loss, _ = lm_loss(model, batch)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, int(sum(_tokens(b) for b in micro_batches))


def speed(rows: Rows, group_size: int, steps: int, micro: int, accum: int, cap: int) -> dict:
    """`steps` (a multiple of group_size): whole groups, so both orders train the same rows."""
    assert steps % group_size == 0, (steps, group_size)
    model, opt = build_model(64)
    orders = {b: stream(rows, b, group_size, micro, accum) for b in ("random", "length_grouped")}
    batches = {
        b: [[collate(_rows(rows, mb), eos_id=1) for mb in s.step_indices()] for _ in range(steps)]
        for b, s in orders.items()
    }
    for b in batches:  # warm-up: allocator, autograd graph caches
        train_step(model, opt, batches[b][0])
    seconds = {b: 0.0 for b in batches}
    tokens = {b: 0 for b in batches}
    for i in range(steps):
        for b in ("random", "length_grouped") if i % 2 == 0 else ("length_grouped", "random"):
            dt, n = train_step(model, opt, batches[b][i])
            seconds[b] += dt
            tokens[b] += n
    assert tokens["random"] == tokens["length_grouped"], tokens  # the same rows in both orders
    out = {
        "cap": cap,
        "steps": steps,
        "group_size": group_size,
        "rows": steps * micro * accum,
        "useful_tokens": tokens["random"],
    }
    for b in batches:
        slots = sum(int(m["attention_mask"].numel() + m["labels"].numel()) for step in batches[b] for m in step)
        out[b] = {
            "seconds": seconds[b],
            "useful_tokens_per_s": tokens[b] / seconds[b],
            "padding": 1 - tokens[b] / slots,
        }
    out["useful_tokens_per_s_ratio"] = (
        out["length_grouped"]["useful_tokens_per_s"] / out["random"]["useful_tokens_per_s"]
    )
    return out


def part_speed(args) -> dict:
    torch.set_num_threads(1)
    micro, accum = 8, 2
    results = []
    for cap in args.caps:
        rows = Rows(args.rows, cap)
        epoch = len(rows) // (micro * accum)
        pad = {"random": padding(rows, stream(rows, "random", 1, micro, accum), epoch)}
        for m in args.group_sizes:
            pad[f"length_grouped_g{m}"] = padding(rows, stream(rows, "length_grouped", m, micro, accum), epoch)
        entry = {"cap": cap, "distribution": rows.describe(), "padding_over_an_epoch": pad}
        print(f"cap {cap}: {rows.describe()}", flush=True)
        for name, p in pad.items():
            print(
                f"  {name:>22}: padding {p['padding']:.3f} (input {p['input_padding']:.3f}, "
                f"target {p['target_padding']:.3f})",
                flush=True,
            )
        entry["timed"] = speed(rows, args.timed_group_size or args.timed_steps, args.timed_steps, micro, accum, cap)
        t = entry["timed"]
        print(
            f"  timed {t['steps']} steps, group {t['group_size']} ({t['rows']} rows, {t['useful_tokens']} useful tokens): random "
            f"{t['random']['useful_tokens_per_s']:.0f} tok/s (padding {t['random']['padding']:.3f}), "
            f"length_grouped {t['length_grouped']['useful_tokens_per_s']:.0f} tok/s (padding "
            f"{t['length_grouped']['padding']:.3f}): {t['useful_tokens_per_s_ratio']:.2f}x",
            flush=True,
        )
        results.append(entry)
    return {
        "micro_batch": micro,
        "grad_accum": accum,
        "model": ARCH,
        "vocab": VOCAB,
        "adapter": "poly S8 r1",
        "threads": 1,
        "by_cap": results,
    }


# ---- validation loss at equal steps ----------------------------------------------------------------------
def prepare_embedded(work: Path) -> Path:
    out = work / "embedded"
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


def final_val_loss(run_dir: Path) -> float:
    last = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "eval" and "val/loss" in row:
            last = row
    return float(last["val/loss"])


def one_run(data: Path, run_dir: Path, seed: int, batching: str, args, env: dict) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--config",
        str(REPO / "configs" / "pretrain" / "tiny_cpu.yaml"),
        f"data.dir={data}",
        f"run.dir={run_dir}",
        f"train.seed={seed}",
        f"data.batching={batching}",
        f"data.group_size={args.loss_group_size}",
        f"train.steps={args.loss_steps}",
        "train.progress_bar=false",
        "train.heatmap_max_layers=0",
        "train.export_at_end=false",
        "train.save_checkpoints=false",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    loss = final_val_loss(run_dir)
    print(f"  seed {seed} {batching:>14}: final val loss {loss:.4f}", flush=True)
    return {"seed": seed, "val_loss": loss, "wall_s": time.perf_counter() - start}


def part_loss(args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else prepare_embedded(work)
        plan = [(seed, b) for seed in args.seeds for b in args.batchings]
        with ThreadPoolExecutor(args.jobs) as pool:  # runs are independent processes
            done = list(pool.map(lambda sb: one_run(data, work / f"{sb[1]}_{sb[0]}", sb[0], sb[1], args, env), plan))
        runs = {b: [r for (_, pb), r in zip(plan, done) if pb == b] for b in args.batchings}
    summary = {}
    for b, rs in runs.items():
        losses = [r["val_loss"] for r in rs]
        summary[b] = {
            "mean": statistics.mean(losses),
            "stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "min": min(losses),
            "max": max(losses),
        }
    if len(runs) == 2:
        diffs = [g["val_loss"] - r["val_loss"] for g, r in zip(runs["length_grouped"], runs["random"])]
        summary["paired_difference_grouped_minus_random"] = {"mean": statistics.mean(diffs), "per_seed": diffs}
    return {
        "data": "embedded mixture (data_prep)" if not args.data else args.data,
        "config": "tiny_cpu.yaml",
        "steps": args.loss_steps,
        "group_size": args.loss_group_size,
        "runs": runs,
        "summary": summary,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["speed", "loss", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="small sizes: checks that the script runs")
    p.add_argument("--caps", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--group-sizes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--timed-steps", type=int, default=32, help="steps timed per order")
    p.add_argument(
        "--timed-group-size",
        type=int,
        default=None,
        help="group size of the timed length-grouped steps (default: --timed-steps, one group)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--loss-group-size", type=int, default=4)
    p.add_argument(
        "--batchings",
        nargs="+",
        choices=["random", "length_grouped"],
        default=["random", "length_grouped"],
        help="loss part: which orders to run",
    )
    p.add_argument("--jobs", type=int, default=1, help="loss part: runs at a time")
    p.add_argument("--data", help="a prepared data directory for the loss part (default: prepare embedded)")
    p.add_argument("--out", default="benchmarks/results/batching.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.timed_steps, args.caps, args.seeds, args.loss_steps = 2048, 2, [256], [0, 1], 4
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "load_average_at_start": os.getloadavg(),
    }
    result = {"meta": meta}
    if args.part in ("speed", "all"):
        result["speed"] = part_speed(args)
    if args.part in ("loss", "all"):
        result["loss"] = part_loss(args)
        for b, s in result["loss"]["summary"].items():
            print(f"{b}: {s}", flush=True)
    meta["load_average_at_end"] = os.getloadavg()
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
