"""Speed and memory of the adapters, side by side with the alternatives, in one run.

Each row times forward+backward and measures the activation memory autograd saves for backward
(unique storages). The sides of a row run interleaved, one step each per round (their order alternating),
so load on a shared machine hits both alike; a row reports each side's median and range over the rounds
and the median and range of the per-round ratio. Rows:
  * Poly / MHR: our mixing once per distinct task vs mixing per example (what peft and the official
    code do), with 1, a few, or all-distinct tasks in the batch; and peft's Poly on the same T5.
  * LoRA: ours vs peft's LoRA on the same T5.
  * TLoRA / TensorPoly-I: materialising A and B once per distinct task vs contracting the Kronecker
    factors with every token.
  * TensorPoly-X: our cheaper-path choice vs materialising d_in x d_out per example (official code);
    and ours with 1, 4 and 16 distinct tasks side by side (the cost of many tasks in one batch).
  * TensorPoly-I's factor build with the official Kronecker LayerNorm at T0-3B shapes (all 432 adapted
    layers, R8 N2 r16, fp32): recomputed in backward (shipped) vs saved for backward, 1 and 8 tasks.

Usage: python benchmarks/bench_adapters.py [--quick] [--sections layers,tasks,factors,peft]
       [--out benchmarks/results/adapters.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters, task_routing
from tensorpoly_ds.adapters.inject import ADAPTER_CLASSES
from tensorpoly_ds.adapters.routing import RoutingTable
from tensorpoly_ds.adapters.tlora import TensorPolyILinear, kron_columns
from tpds_common.files import atomic_write_text


def saved_activation_bytes(fn) -> int:
    seen, total = {}, 0  # held, so that no address counted here is reused by a later storage

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and t.device.type != "meta":
            seen[key] = t.untyped_storage()
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return total


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per forward+backward of each function, one call of each per round (order alternating)."""
    for fn in fns.values():
        fn().backward()  # warm-up
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            fns[name]().backward()
            times[name].append(time.perf_counter() - start)
    return times


def spread(values: list[float], scale: float = 1.0) -> dict:
    return dict(median=scale * statistics.median(values), min=scale * min(values), max=scale * max(values))


def compared(ours: list[float], alt: list[float]) -> dict:
    """Row fields for two interleaved timings: per-side median and range (ms), the ratio of the medians and
    the median and range of the per-round ratios alt / ours."""
    per_round = [a / o for o, a in zip(ours, alt)]
    o, a, ratio = spread(ours, 1e3), spread(alt, 1e3), spread(per_round)
    return dict(
        ours_ms=o["median"],
        ours_ms_range=[o["min"], o["max"]],
        alternative_ms=a["median"],
        alternative_ms_range=[a["min"], a["max"]],
        speedup=a["median"] / o["median"],
        speedup_per_round=ratio["median"],
        speedup_per_round_range=[ratio["min"], ratio["max"]],
        rounds=len(ours),
    )


def batch_task_ids(batch: int, distinct: int) -> torch.Tensor:
    """`distinct` tasks over `batch` rows in a fixed shuffled order (a real batch is not sorted by task)."""
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(0))
    return (torch.arange(batch) % distinct)[order]


# --- single-layer alternatives -------------------------------------------------------------------
def per_example_poly(layer, x, ids):
    """Mix A and B for every example (peft / official style), then bmm."""
    w = layer.routing.weights(ids)  # [b, h, S]
    a = torch.einsum("bhs,shir->bhir", w, layer.lora_a).reshape(x.shape[0], layer.in_features, -1)
    b = torch.einsum("bhs,shro->brho", w, layer.lora_b).reshape(x.shape[0], -1, layer.out_features)
    return layer.base(x) + torch.bmm(torch.bmm(x, a), b) * layer.scale


def per_token_kron(layer, x, ids):
    """Contract every token with the Kronecker factors instead of materialising A and B."""
    w = layer.routing.weights(ids)[:, 0, :]  # [b, R]
    leaves_a = layer.side_a.leaves  # [N, R, r, q]
    n, q = leaves_a.shape[0], leaves_a.shape[-1]
    pad = q**n - layer.in_features
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:2], *([q] * n))
    letters = "ijkl"[:n]
    # h[b, t, R, r] = sum_{i,j,..} x[b,t,i,j,..] * v1[R,r,i] * v2[R,r,j] ...
    eq = f"bt{letters}," + ",".join(f"Rr{c}" for c in letters) + "->btRr"
    h = torch.einsum(eq, xp, *[leaves_a[m] for m in range(n)])
    h = torch.einsum("btRr,bR->btr", h, w)
    b_terms = kron_columns(layer.side_b.leaves.transpose(0, 1))[..., : layer.out_features]  # [R, r, out]
    b = torch.einsum("bR,Rro->bro", w, b_terms)
    return layer.base(x) + torch.bmm(h, b) * layer.scale


def per_example_dense_tt(layer, x, ids):
    """Materialise delta W (d_in x d_out) for every example, as the official TensorPoly-X code does."""
    w = layer.routing.weights(ids)
    return layer.base(x) + torch.bmm(x, layer.dense(w))


def single_layer_rows(args) -> list[dict]:
    rows = []
    d, batch, seq = args.dim, args.batch, args.seq
    specs = [
        ("poly", dict(skills=8, rank=1), per_example_poly, "per-example mixing"),
        ("mhr", dict(skills=8, heads=16, rank=1), per_example_poly, "per-example mixing"),
        ("tensorpoly_i", dict(rank=16, tensor_rank=8, order=2), per_token_kron, "per-token Kronecker"),
        ("tensorpoly_x", dict(tensor_rank=4, order=2), per_example_dense_tt, "per-example dense dW"),
    ]
    for method, kw, alternative, alt_name in specs:
        cfg = AdapterConfig(method=method, **kw)
        layer = ADAPTER_CLASSES[method](nn.Linear(d, d), cfg, "encoder", method)
        heads, skills = layer.routing_shape
        layer.attach_routing(RoutingTable(64, heads, skills))
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.normal_(std=0.02)
        x = torch.randn(batch, seq, d)
        for distinct in sorted({1, 4, batch}):
            ids = batch_task_ids(batch, distinct)

            def ours():
                with task_routing(ids):
                    return layer(x).square().mean()

            def theirs():
                return alternative(layer, x, ids).square().mean()

            with torch.no_grad():
                with task_routing(ids):
                    ref = layer(x)
                torch.testing.assert_close(alternative(layer, x, ids), ref, rtol=1e-4, atol=1e-4)
            times = interleaved({"ours": ours, "alt": theirs}, args.repeats)
            m_ours, m_alt = saved_activation_bytes(ours), saved_activation_bytes(theirs)
            rows.append(
                dict(
                    case=f"{method} layer d={d} b={batch} L={seq}",
                    distinct_tasks=distinct,
                    alternative=alt_name,
                    **compared(times["ours"], times["alt"]),
                    ours_saved_mb=m_ours / 2**20,
                    alternative_saved_mb=m_alt / 2**20,
                )
            )
    return rows


def tensorpoly_x_task_rows(args) -> list[dict]:
    """TensorPoly-X (R=4, N=2, the layer rows' shapes) with 1, 4 and all-distinct tasks in the batch,
    interleaved; each row compares k tasks with 1 task (speedup < 1: k tasks cost more)."""
    d, batch, seq = args.dim, args.batch, args.seq
    cfg = AdapterConfig(method="tensorpoly_x", tensor_rank=4, order=2)
    layer = ADAPTER_CLASSES["tensorpoly_x"](nn.Linear(d, d), cfg, "encoder", "tensorpoly_x")
    layer.attach_routing(RoutingTable(64, *layer.routing_shape))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                p.normal_(std=0.02)
    x = torch.randn(batch, seq, d)
    counts = sorted({1, 4, batch})

    def step(ids):
        def run():
            with task_routing(ids):
                return layer(x).square().mean()

        return run

    fns = {k: step(batch_task_ids(batch, k)) for k in counts}
    times = interleaved(fns, args.repeats)
    rows = []
    for k in counts:
        paths = {layer.choose_path(batch * seq, k)}
        rows.append(
            dict(
                case=f"tensorpoly_x d={d} b={batch} L={seq}, k tasks",
                distinct_tasks=k,
                alternative="same layer, 1 task",
                **compared(times[k], times[1]),
                ours_saved_mb=saved_activation_bytes(fns[k]) / 2**20,
                alternative_saved_mb=saved_activation_bytes(fns[1]) / 2**20,
                path=paths.pop(),
            )
        )
    return rows


# --- TensorPoly-I's factor build at T0-3B shapes --------------------------------------------------
# (d_in, d_out) of the 432 adapted layers of T0-3B and how many have it: q/k/v/o of 24 encoder self-attentions
# and 24 decoder self- and cross-attentions; wi_0 and wi_1 of 48 FFNs; wo of 48 FFNs.
T0_3B_LAYERS = [((2048, 2048), 288), ((2048, 5120), 96), ((5120, 2048), 48)]


def kron_factor_rows(args) -> list[dict]:
    """One layer per distinct shape (one token per task: the factor build does not depend on the tokens),
    scaled by the number of layers of that shape."""
    cfg = AdapterConfig(method="tensorpoly_i", rank=16, tensor_rank=8, order=2, layernorm=True)
    rows = []
    for tasks in (1, 8):
        totals = {True: [0.0, 0], False: [0.0, 0]}  # recompute -> [seconds, saved bytes]
        for (d_in, d_out), count in T0_3B_LAYERS:
            layer = TensorPolyILinear(nn.Linear(d_in, d_out).requires_grad_(False), cfg, "encoder", "t0")
            layer.attach_routing(RoutingTable(8, *layer.routing_shape))
            x, ids = torch.randn(tasks, 1, d_in), torch.arange(tasks)

            def run(recompute):
                def step():
                    layer.recompute_factors = recompute
                    with task_routing(ids):
                        return layer(x).square().mean()

                return step

            fns = {recompute: run(recompute) for recompute in (True, False)}
            times = interleaved(fns, args.repeats)
            for recompute, fn in fns.items():
                totals[recompute][0] += count * statistics.median(times[recompute])
                totals[recompute][1] += count * saved_activation_bytes(fn)
        (t_ours, m_ours), (t_alt, m_alt) = totals[True], totals[False]
        rows.append(
            dict(
                case="T0-3B TensorPoly-I R8 N2 LN factors, 432 l.",
                distinct_tasks=tasks,
                ours_ms=1e3 * t_ours,
                alternative="factors saved for backward",
                alternative_ms=1e3 * t_alt,
                speedup=t_alt / t_ours,
                ours_saved_mb=m_ours / 2**20,
                alternative_saved_mb=m_alt / 2**20,
            )
        )
    return rows


# --- whole-model comparison with peft -------------------------------------------------------------
def t5_model(d_model: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=512,
        d_model=d_model,
        d_kv=64,
        num_heads=d_model // 64,
        d_ff=4 * d_model,
        num_layers=4,
        num_decoder_layers=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def peft_rows(args) -> list[dict]:
    try:
        import peft
    except ImportError:
        return [dict(case="peft comparison", skipped="peft not installed (pip install peft)")]
    rows = []
    x = torch.randint(2, 512, (args.batch, args.seq))
    y = torch.randint(2, 512, (args.batch, 32))
    targets = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    for name, ours_cfg, peft_cfg in [
        (
            "LoRA r=4",
            AdapterConfig(method="lora", rank=4),
            peft.LoraConfig(r=4, lora_alpha=1, target_modules=targets, lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"),
        ),
        (
            "Poly S=8 r=1",
            AdapterConfig(method="poly", skills=8, rank=1),
            peft.PolyConfig(r=1, n_skills=8, n_tasks=64, n_splits=1, target_modules=targets, task_type="SEQ_2_SEQ_LM"),
        ),
        (
            "MHR S=8 h=8 r=1",
            AdapterConfig(method="mhr", skills=8, heads=8, rank=1),
            peft.PolyConfig(r=1, n_skills=8, n_tasks=64, n_splits=8, target_modules=targets, task_type="SEQ_2_SEQ_LM"),
        ),
    ]:
        routed = ours_cfg.routed
        ids = batch_task_ids(args.batch, 4)
        ours_model = t5_model(args.dim)
        inject_adapters(ours_model, ours_cfg, num_tasks=64)
        ours_model.train()
        peft_model = peft.get_peft_model(t5_model(args.dim), peft_cfg)
        peft_model.train()
        kwargs = {"task_ids": ids} if routed else {}

        def ours():
            with task_routing(ids):
                return ours_model(input_ids=x, labels=y).loss

        def theirs():
            return peft_model(input_ids=x, labels=y, **kwargs).loss

        times = interleaved({"ours": ours, "peft": theirs}, args.rounds)
        m_ours, m_alt = saved_activation_bytes(ours), saved_activation_bytes(theirs)
        rows.append(
            dict(
                case=f"T5 d={args.dim} 4+4 layers, {name}",
                distinct_tasks=4 if routed else 1,
                alternative=f"peft {peft.__version__}",
                **compared(times["ours"], times["peft"]),
                ours_saved_mb=m_ours / 2**20,
                alternative_saved_mb=m_alt / 2**20,
            )
        )
    return rows


def _range(r: dict, key: str, fmt: str) -> str:
    lo_hi = r.get(key)
    return "" if lo_hi is None else f"{lo_hi[0]:{fmt}}-{lo_hi[1]:{fmt}}"


def format_table(rows: list[dict]) -> str:
    """Medians, then (ranges over the rounds); speedup = alternative / ours, of the medians, then the
    median (range) of the per-round ratios."""
    head = (
        f"{'case':<44}{'tasks':>6}{'ours ms':>10}{'(range)':>16}{'alt ms':>10}{'(range)':>16}{'speedup':>9}"
        f"{'per round':>10}{'(range)':>12}{'ours MB':>9}{'alt MB':>9}  alternative"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['case']:<44}  skipped: {r['skipped']}")
            continue
        per_round = f"{r['speedup_per_round']:.2f}x" if "speedup_per_round" in r else ""
        lines.append(
            f"{r['case']:<44}{r['distinct_tasks']:>6}{r['ours_ms']:>10.2f}{_range(r, 'ours_ms_range', '.1f'):>16}"
            f"{r['alternative_ms']:>10.2f}{_range(r, 'alternative_ms_range', '.1f'):>16}{r['speedup']:>8.2f}x"
            f"{per_round:>10}{_range(r, 'speedup_per_round_range', '.2f'):>12}"
            f"{r['ours_saved_mb']:>9.1f}{r['alternative_saved_mb']:>9.1f}  {r['alternative']}"
        )
    return "\n".join(lines)


SECTIONS = {
    "layers": single_layer_rows,
    "tasks": tensorpoly_x_task_rows,
    "factors": kron_factor_rows,
    "peft": peft_rows,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (seconds)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="rounds of the single-layer and factor rows")
    p.add_argument("--rounds", type=int, default=9, help="rounds of the whole-model rows against peft")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/adapters.json")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.batch, args.seq, args.repeats, args.rounds = 256, 8, 32, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    rows = [row for name in sections for row in SECTIONS[name](args)]
    print(format_table(rows))
    meta = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        args=vars(args),
    )
    atomic_write_text(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
