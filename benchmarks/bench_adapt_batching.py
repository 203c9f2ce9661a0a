"""Random vs length-aware batching of adaptation jobs (job fields `batching`, `eval_batching`, `chunk_tokens`):
padding and useful tokens/s of few-shot training steps and of rank-classification evaluation, side by side in
one run. Arms: training random / length_grouped / length_grouped + chunk_tokens; evaluation in_order /
length_sorted / length_sorted + chunk_tokens (`--chunk-tokens`, default 512; 0 drops the chunked arms). The
padding of other budgets (`--padding-budgets`) is reported without timing.

The rows are synthetic. Their lengths are MADE UP (no P3 download or length statistics are available here):
one entry per held-out T0 task (ANLI R1-R3, CB, COPA, HellaSwag, RTE, StoryCloze, WiC, Winogrande, WSC) with our
rough guess, in T5 tokens, of its prompted inputs' median length, their spread, its number of answer choices
and their median length. Inputs within a task differ by prompt template (a few templates per task, each a
log-normal factor around 1 with sigma 0.25) and by example (log-normal, the task's sigma); choices are
log-normal around the task's median (sigma 0.35) plus EOS. An adaptation job is one task, so padding is measured
within a task, which is where these jobs pad: the spread inside one held-out task is much smaller than across
P3's mixture (benchmarks/bench_batching.py), so the gains are smaller too.

Padding (input + decoder slots that are padding): training over 20 epochs of k = 32 shots, batch 8 (the T0
sweep's recipe; 4 batches an epoch, group_size 4: a whole epoch is one window), random vs length_grouped; eval
over each task's 1,000 eval rows (fewer where the task is smaller), batch 16, in order vs length_sorted. The
decoder's slots are choices x longest choice of the forward pass (rank classification flattens every choice);
a chunked arm's forward passes are the library's own plan (evaluation.chunking.plan_chunks).

Useful tokens/s (on `--timed-tasks`, default ANLI R1, CB, COPA: long and short inputs; the time budget of a
busy 2-CPU machine keeps it to three, in `--rounds` repeated rounds): a T5 with d_model 256 (4+4 layers, 8 heads, d_ff 1024, gated-GELU, T0's 32,128-word
vocabulary) with Poly adapters (8 skills, rank 1, frozen backbone, AdamW on the adapters), one thread. Training:
one epoch (4 steps of T-Few losses) per task in every arm, the arms alternating step by step; all train
the same 32 rows, so the useful tokens are equal and the ratio is a time ratio. Eval: `--eval-batches` batches
of each order, evenly spaced over the task's whole eval set (in order: any batches; sorted: from short to long),
alternating batch by batch; useful tokens/s is each order's useful tokens over its seconds.

Usage: python benchmarks/bench_adapt_batching.py [--quick] [--out benchmarks/results/adapt_batching.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tensorpoly_ds.adapt.local_train import EpochSampler
from tensorpoly_ds.evaluation import LossWeights, collate_choices, length_keys, length_order, tfew_losses
from tensorpoly_ds.evaluation.chunking import plan_chunks
from tensorpoly_ds.evaluation.rank_classification import score_batch
from tpds_common.files import atomic_write_text

VOCAB = 32128
ARCH = dict(d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_layers=4, num_decoder_layers=4)
# task: (input median, input sigma, templates, choices, choice median, eval rows) -- made up, see the docstring
TASKS = {
    "anli_r1": (105, 0.35, 15, 3, 2, 1000),
    "anli_r2": (105, 0.35, 15, 3, 2, 1000),
    "anli_r3": (95, 0.40, 15, 3, 2, 1000),
    "cb": (90, 0.45, 15, 3, 2, 56),
    "copa": (30, 0.30, 12, 2, 9, 100),
    "hellaswag": (95, 0.35, 4, 4, 25, 1000),
    "rte": (85, 0.45, 10, 2, 2, 277),
    "story_cloze": (80, 0.20, 5, 2, 12, 1000),
    "wic": (45, 0.30, 10, 2, 2, 638),
    "winogrande": (40, 0.25, 5, 2, 4, 1000),
    "wsc": (50, 0.35, 10, 2, 2, 104),
}


def task_rows(name: str, n: int, seed: int) -> list[dict]:
    in_median, in_sigma, templates, n_choices, choice_median, _ = TASKS[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    factor = rng.lognormal(0.0, 0.25, templates)
    rows = []
    for i in range(n):
        length = int(np.clip(rng.lognormal(np.log(in_median * factor[i % templates]), in_sigma), 4, 1024))
        choices = [
            rng.integers(2, VOCAB, max(1, int(rng.lognormal(np.log(choice_median), 0.35)))).tolist() + [1]
            for _ in range(n_choices)
        ]
        rows.append(
            {
                "input_ids": rng.integers(2, VOCAB, length).tolist(),
                "choice_ids": choices,
                "target_ids": choices[0],
                "label": 0,
                "task_name": name,
                "template": f"t{i % templates}",
                "example_id": i,
            }
        )
    return rows


def slots(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """(useful, total) input and decoder slots of one collated choice batch."""
    keys = length_keys(rows)
    choices = [len(c) for r in rows for c in r["choice_ids"]]
    return {
        "input": (int(keys[:, 0].sum()), len(rows) * int(keys[:, 0].max())),
        "decoder": (sum(choices), len(choices) * max(choices)),
    }


def useful_tokens(rows: list[dict]) -> int:
    return sum(u for u, _ in slots(rows).values())


def chunked(rows: list[dict], batch: list[int], chunk_tokens: int) -> list[list[int]]:
    """The forward passes of one batch under the job's `chunk_tokens` (the library's own plan)."""
    if not chunk_tokens:
        return [batch]
    keys = length_keys([rows[i] for i in batch])
    counts = np.array([len(rows[i]["choice_ids"]) for i in batch], dtype=np.int64)
    return [[batch[j] for j in c] for c in plan_chunks(keys[:, 0], keys[:, 1], counts, chunk_tokens)]


def padding(rows: list[dict], batches: list[list[int]], chunk_tokens: int = 0) -> dict[str, float]:
    """Padding fraction of input + decoder slots, and of each alone (each forward pass padded to its own rows)."""
    sums = {"input": [0, 0], "decoder": [0, 0]}
    for b in batches:
        for piece in chunked(rows, b, chunk_tokens):
            for part, (u, t) in slots([rows[i] for i in piece]).items():
                sums[part][0] += u
                sums[part][1] += t
    out = {f"{part}_padding": 1 - u / t for part, (u, t) in sums.items()}
    out["padding"] = 1 - sum(u for u, _ in sums.values()) / sum(t for _, t in sums.values())
    return out


def train_batches(rows, batching: str, batch: int, steps: int, seed: int, group: int = 4) -> list[list[int]]:
    lengths = length_keys(rows) if batching == "length_grouped" else None
    sampler = EpochSampler(len(rows), batch, seed, lengths=lengths, group_size=group)
    return [sampler.next() for _ in range(steps)]


def eval_batches(rows, eval_batching: str, batch: int) -> list[list[int]]:
    order = length_order(rows) if eval_batching == "length_sorted" else list(range(len(rows)))
    return [order[s : s + batch] for s in range(0, len(order), batch)]


def build_model():
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.adapters import AdapterConfig, inject_adapters
    from tensorpoly_ds.models import t5_config

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=VOCAB, **ARCH))
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapters(model, AdapterConfig(method="poly", skills=8, rank=1), num_tasks=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def timed_train(model, opt, batch, chunk_tokens: int) -> float:
    model.train()
    start = time.perf_counter()
    tfew_losses(model, batch, LossWeights(), chunk_tokens)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def timed_eval(model, batch, chunk_tokens: int) -> float:
    model.eval()
    start = time.perf_counter()
    score_batch(model, batch, 1.0, chunk_tokens)
    return time.perf_counter() - start


def interleaved(run, batches: dict[str, list]) -> dict[str, float]:
    """Seconds per order, the orders alternating batch by batch (which goes first alternates too)."""
    names = list(batches)
    seconds = dict.fromkeys(names, 0.0)
    for i in range(len(batches[names[0]])):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds[name] += run(name, batches[name][i])
    return seconds


def arms(chunk_tokens: int) -> tuple[dict, dict]:
    """Training and evaluation arms: name -> (row order, chunk_tokens); the first of each is the baseline."""
    train = {"random": ("random", 0), "length_grouped": ("length_grouped", 0)}
    evals = {"in_order": ("in_order", 0), "length_sorted": ("length_sorted", 0)}
    if chunk_tokens:
        train["length_grouped+chunks"] = ("length_grouped", chunk_tokens)
        evals["length_sorted+chunks"] = ("length_sorted", chunk_tokens)
    return train, evals


def measure(args) -> dict:
    torch.set_num_threads(1)
    model, opt = build_model()
    batch, eval_batch, k = 8, 16, 32
    train_arms, eval_arms = arms(args.chunk_tokens)
    tasks, totals = {}, {}
    for name, spec in TASKS.items():
        shots = task_rows(name, k, seed=1)
        evals = task_rows(name, min(spec[5], args.pad_eval_rows), seed=2)
        entry = {
            "train_padding": {
                a: padding(shots, train_batches(shots, order, batch, 20 * k // batch, seed=0), chunk)
                for a, (order, chunk) in train_arms.items()
            },
            "eval_padding": {
                a: padding(evals, eval_batches(evals, order, eval_batch), chunk)
                for a, (order, chunk) in eval_arms.items()
            },
            # padding only: what other budgets would give (length-aware orders)
            "padding_by_chunk_tokens": {
                str(c): {
                    "train": padding(shots, train_batches(shots, "length_grouped", batch, 20 * k // batch, 0), c),
                    "eval": padding(evals, eval_batches(evals, "length_sorted", eval_batch), c),
                }
                for c in args.padding_budgets
            },
        }
        timed = {}
        if args.eval_batches and name in args.timed_tasks:
            one_epoch = {
                a: train_batches(shots, order, batch, k // batch, seed=0) for a, (order, _) in train_arms.items()
            }
            tb = {a: [collate_choices([shots[i] for i in ix], 0) for ix in v] for a, v in one_epoch.items()}
            # a sample of each order's batches of the whole eval set, evenly spaced (short to long when sorted)
            picked = {}
            for a, (order, _) in eval_arms.items():
                full = eval_batches(evals, order, eval_batch)
                picked[a] = [full[int(j)] for j in np.linspace(0, len(full) - 1, args.eval_batches).round()]
            eb = {a: [collate_choices([evals[i] for i in ix], 0) for ix in v] for a, v in picked.items()}
            timed_train(model, opt, tb["random"][0], 0)  # warm-up
            run_train = lambda a, b: timed_train(model, opt, b, train_arms[a][1])  # noqa: E731
            run_eval = lambda a, b: timed_eval(model, b, eval_arms[a][1])  # noqa: E731
            for _ in range(args.rounds):  # repeated rounds: the spread of the ratio under the machine's load
                timed.setdefault("train_s_rounds", []).append(interleaved(run_train, tb))
                timed.setdefault("eval_s_rounds", []).append(interleaved(run_eval, eb))
            for part in ("train", "eval"):
                rounds = timed[f"{part}_s_rounds"]
                timed[f"{part}_s"] = {o: sum(r[o] for r in rounds) for o in rounds[0]}
            train_useful = sum(useful_tokens([shots[i] for i in ix]) for ix in one_epoch["random"])
            useful = {
                "train": dict.fromkeys(one_epoch, train_useful),  # the same rows in every arm
                "eval": {a: sum(useful_tokens([evals[i] for i in ix]) for ix in v) for a, v in picked.items()},
            }
            timed["useful_tokens"] = useful
            for part, key in (("train", "train_s"), ("eval", "eval_s")):
                for order, s in timed[key].items():
                    totals.setdefault(part, {}).setdefault(order, [0.0, 0])
                    totals[part][order][0] += s
                    totals[part][order][1] += useful[part][order] * args.rounds
        entry["timed"] = timed
        tasks[name] = entry
        line = f"{name:>12}: train padding " + " -> ".join(
            f"{v['padding']:.3f}" for v in entry["train_padding"].values()
        )
        line += ", eval padding " + " -> ".join(f"{v['padding']:.3f}" for v in entry["eval_padding"].values())
        if timed:
            for part in ("train", "eval"):
                line += f"; {part} s " + " / ".join(f"{v:.2f}" for v in timed[f"{part}_s"].values())
        print(line, flush=True)
    summary = summarise(tasks, totals, train_arms, eval_arms, args.padding_budgets)
    return {"tasks": tasks, "summary": summary}


def summarise(tasks: dict, totals: dict, train_arms: dict, eval_arms: dict, budgets: list[int]) -> dict:
    parts = ("padding", "input_padding", "decoder_padding")

    def mean(values: list[dict]) -> dict:
        return {p: float(np.mean([v[p] for v in values])) for p in parts}

    out = {
        "train_padding_mean": {a: mean([t["train_padding"][a] for t in tasks.values()]) for a in train_arms},
        "eval_padding_mean": {a: mean([t["eval_padding"][a] for t in tasks.values()]) for a in eval_arms},
        "padding_by_chunk_tokens_mean": {
            str(c): {
                part: mean([t["padding_by_chunk_tokens"][str(c)][part] for t in tasks.values()])
                for part in ("train", "eval")
            }
            for c in budgets
        },
    }
    timed = [t["timed"] for t in tasks.values() if t["timed"]]
    for part, orders in totals.items():
        names = list(train_arms if part == "train" else eval_arms)
        base = names[0]
        tps = {o: n / s for o, (s, n) in orders.items()}
        ratios, per_round = {}, {}
        for arm in names[1:]:
            ratios[arm] = tps[arm] / tps[base]
            per_round[arm] = []
            for r in range(len(timed[0][f"{part}_s_rounds"])):
                rate = {
                    o: sum(t["useful_tokens"][part][o] for t in timed) / sum(t[f"{part}_s_rounds"][r][o] for t in timed)
                    for o in (base, arm)
                }
                per_round[arm].append(rate[arm] / rate[base])
        out[f"{part}_useful_tokens_per_s"] = {**tps, "ratio": ratios, "ratio_per_round": per_round}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: checks that the script runs")
    p.add_argument(
        "--eval-batches", type=int, default=4, help="eval batches timed per task and order (0: padding only)"
    )
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (each: every timed batch once per order)")
    p.add_argument(
        "--timed-tasks",
        nargs="+",
        choices=list(TASKS),
        default=["anli_r1", "cb", "copa"],
        help="tasks whose steps are timed (padding: every task); the default spans long and short inputs",
    )
    p.add_argument("--pad-eval-rows", type=int, default=1000, help="eval rows per task for the padding numbers")
    p.add_argument(
        "--chunk-tokens", type=int, default=512, help="the chunked arms' job field chunk_tokens (0: no chunked arm)"
    )
    p.add_argument(
        "--padding-budgets",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[2048, 1024, 512, 256],
        help="comma-separated chunk_tokens whose padding (not speed) is reported too",
    )
    p.add_argument("--out", default="benchmarks/results/adapt_batching.json")
    args = p.parse_args(argv)
    if args.quick:
        args.eval_batches, args.pad_eval_rows, args.timed_tasks, args.rounds = 2, 64, ["copa"], 2
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "model": ARCH,
        "adapter": "poly S8 r1",
        "threads": 1,
        "k": 32,
        "batch_size": 8,
        "group_size": 4,
        "eval_batch_size": 16,
        "chunk_tokens": args.chunk_tokens,
        "padding_budgets": args.padding_budgets,
        "timed_eval_batches_per_task": args.eval_batches,
        "timed_tasks": args.timed_tasks,
        "rounds": args.rounds,
        "task_shapes_made_up": {
            k: dict(zip(("input_median", "input_sigma", "templates", "choices", "choice_median", "eval_rows"), v))
            for k, v in TASKS.items()
        },
        "load_average_at_start": os.getloadavg(),
    }
    start = time.perf_counter()
    result = {"meta": meta, **measure(args)}
    meta["load_average_at_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - start
    s = result["summary"]
    train_arms, eval_arms = arms(args.chunk_tokens)
    print("\n| part | arm | padding (mean of 11 tasks) | input / decoder padding | useful tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for part, pad_key, tps_key, names in (
        ("training", "train_padding_mean", "train_useful_tokens_per_s", list(train_arms)),
        ("rank classification", "eval_padding_mean", "eval_useful_tokens_per_s", list(eval_arms)),
    ):
        tps = s.get(tps_key, {})
        for arm in names:
            ratio = ""
            if tps and arm in tps["ratio"]:
                spread = ", ".join(f"{x:.2f}" for x in tps["ratio_per_round"][arm])
                ratio = f"{tps['ratio'][arm]:.2f}x (rounds {spread})"
            rate = f"{tps[arm]:.0f}" if tps else "-"
            pad = s[pad_key][arm]
            print(
                f"| {part} | {arm} | {pad['padding']:.1%} | {pad['input_padding']:.1%} / "
                f"{pad['decoder_padding']:.1%} | {rate} | {ratio} |"
            )
    print("\n| chunk_tokens | training padding (length_grouped) | rank classification padding (length_sorted) |")
    print("|---|---|---|")
    for c, v in s["padding_by_chunk_tokens_mean"].items():
        print(f"| {c} | {v['train']['padding']:.1%} | {v['eval']['padding']:.1%} |")
    print(f"load average {meta['load_average_at_start']} -> {meta['load_average_at_end']}, {meta['wall_s']:.0f} s")
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
