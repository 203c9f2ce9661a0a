"""The GPU check: one script, about 6 minutes on one H100/H200, results as JSON (and a table).

On random-init T0-3B in bf16 (vocabulary 32128, batch 8, input and target 256 tokens, 8 distinct tasks of 313):
  1. forward+backward step time and peak GPU memory of the frozen floor (no adapter: the backward through the
     frozen backbone alone), each method with its shipped config (configs/pretrain/*.yaml: LoRA r1, Poly S8,
     MHR S8 h64, TensorPoly-I/II R8 N2 with the official LayerNorm, TensorPoly-I with its factors saved instead
     of recomputed, TensorPoly-X R8 N4, (IA)^3) beside peft's LoRA r1 and Poly S8 on the same model;
  2. `tensorpoly-ds pretrain` (TensorPoly-I R8 N2 on the embedded mixture, 20 steps) with ZeRO-0 bf16_autocast
     and with ZeRO-3 bf16: tokens/s, peak GPU memory and host RSS, checkpoint and export sizes.
  3. adaptation steps (T-Few losses, Poly S8, batch 8 of made-up held-out task rows in length_grouped order,
     benchmarks/bench_adapt_batching.py's shapes) with the job's chunk_tokens 0, 1024 and 4096, interleaved step
     by step: whether chunked forward passes, which pay on CPU, pay on a GPU.
What the machine lacks (deepspeed, datasets; transformers at the pinned version) is installed first from a
wheelhouse made here by benchmarks/gpu/prepare_wheelhouse.sh. The JSON is rewritten after every item, so a run
cut short still reports what it measured; --budget-s skips what would not fit.

    python3 benchmarks/gpu/gpu_check.py --wheelhouse benchmarks/gpu/wheelhouse --out $OUT/gpu_check.json
    python benchmarks/gpu/gpu_check.py --cpu-smoke --out /tmp/gpu_smoke.json     # tiny shapes on the CPU, ~1 min
docs/benchmarks.md gives the device tool's command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "pretrain"
TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
METHODS = [
    "lora_r1",
    "poly_S8_r1",
    "mhr_S8_h64",
    "tensorpoly_i_R8_N2",
    "tensorpoly_ii_R8_N2",
    "tensorpoly_x_R8_N4",
    "ia3",
]
NUM_TASKS = 313


@dataclass
class Shapes:
    arch: str
    vocab: int
    batch: int
    input_len: int
    target_len: int
    warmup: int
    iters: int
    pretrain_steps: int
    pretrain_overrides: tuple[str, ...]


GPU = Shapes("t0-3b", 32128, 8, 256, 256, 2, 5, 20, ("model.vocab_size=32128",))
CPU_SMOKE = Shapes("tiny", 64, 4, 16, 8, 1, 2, 3, ("train.micro_batch=2", "train.grad_accum=1"))


# ---- installing what the image lacks ------------------------------------------------------------------
def ensure_packages(wheelhouse: str | None, target: Path) -> list[str]:
    """Install the wheelhouse into `target` (first on sys.path and PYTHONPATH) unless deepspeed and datasets
    import already. Returns what was installed."""
    if all(importlib.util.find_spec(m) is not None for m in ("deepspeed", "datasets")):
        return []
    house = Path(wheelhouse or "")
    wheels, sdists = sorted(house.glob("*.whl")), sorted(house.glob("deepspeed-*.tar.gz"))
    if not wheels or not sdists:
        raise SystemExit(
            f"deepspeed/datasets missing and no wheelhouse at {house!s}: run "
            "benchmarks/gpu/prepare_wheelhouse.sh here and carry the folder"
        )
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
    ]
    subprocess.run([*pip, "--no-compile", *map(str, wheels)], check=True)
    # deepspeed ships as a source distribution; its ops are JIT-built when used, and this check uses none
    subprocess.run([*pip, "--no-build-isolation", str(sdists[-1])], check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    return [p.name for p in (*wheels, *sdists)]


# ---- step time and memory per method -------------------------------------------------------------------
def shipped_adapter(name: str):
    from tensorpoly_ds.engine.config import load_run_config

    return load_run_config([CONFIGS / f"{name}.yaml"]).adapter


def backbone(shapes: Shapes, device):
    import torch
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.models import t5_config

    torch.manual_seed(0)
    with torch.device(device):
        model = T5ForConditionalGeneration(t5_config(shapes.arch, vocab_size=shapes.vocab))
    return model.to(torch.bfloat16)


def peft_model(model, kind: str, num_tasks: int):
    import peft

    if kind == "lora":
        cfg = peft.LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS, lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
    else:
        cfg = peft.PolyConfig(
            r=1, n_skills=8, n_tasks=num_tasks, n_splits=1, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM"
        )
    return peft.get_peft_model(model, cfg)


def cases() -> list[tuple[str, str, object]]:
    """(case, kind, spec): kind 'floor', 'ours' (spec: config name, '-saved' for factors not recomputed) or
    'peft' (spec: lora | poly)."""
    out = [("frozen floor", "floor", None)]
    for name in METHODS:
        out.append((f"ours {name}", "ours", name))
        if name == "tensorpoly_i_R8_N2":
            out.append((f"ours {name}, factors saved", "ours", name + "-saved"))
    out += [("peft lora r1", "peft", "lora"), ("peft poly S8 r1", "peft", "poly")]
    return out


def measure_case(case: str, kind: str, spec, shapes: Shapes, device) -> dict:
    import torch

    from tensorpoly_ds.adapters import inject_adapters, set_factor_recomputation, task_routing

    row = {"case": case}
    if kind == "peft" and importlib.util.find_spec("peft") is None:
        return dict(row, status="skipped: peft not installed")
    model = backbone(shapes, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(2, shapes.vocab, (shapes.batch, shapes.input_len), generator=gen).to(device)
    y = torch.randint(2, shapes.vocab, (shapes.batch, shapes.target_len), generator=gen).to(device)
    ids = (torch.arange(shapes.batch) * 37 % NUM_TASKS).to(device)
    routing, kwargs = contextlib.nullcontext, {}
    if kind == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif kind == "ours":
        name, saved = spec.removesuffix("-saved"), spec.endswith("-saved")
        inject_adapters(model, shipped_adapter(name), NUM_TASKS)
        set_factor_recomputation(model, not saved)
        routing = lambda: task_routing(ids)  # noqa: E731
    else:
        model = peft_model(model, spec, NUM_TASKS)
        if spec == "poly":
            kwargs = {"task_ids": ids}
    model.train()
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cuda = torch.device(device).type == "cuda"

    def step():
        model.zero_grad(set_to_none=True)
        with routing():
            loss = model(input_ids=x, labels=y, **kwargs).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(shapes.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(shapes.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    row.update(
        status="ok",
        step_ms=1e3 * statistics.median(times),
        tokens_per_s=shapes.batch * (shapes.input_len + shapes.target_len) / statistics.median(times),
    )
    if cuda:
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    step = model = None  # the closure holds the model too: free both before the next case's backbone
    if cuda:
        torch.cuda.empty_cache()
    return row


# ---- adaptation steps with and without chunked forward passes -------------------------------------------
ADAPT_TASKS = ("anli_r1", "copa", "hellaswag")  # long inputs, short inputs, long answer choices
ADAPT_CHUNKS = (0, 1024, 4096)


def measure_adaptation(shapes: Shapes, device) -> list[dict]:
    """Median T-Few step (forward + backward) per chunk_tokens and task, the budgets alternating step by step
    over the task's length-grouped batches, and each budget's peak GPU memory."""
    import torch

    from benchmarks.bench_adapt_batching import task_rows, train_batches
    from tensorpoly_ds.adapters import inject_adapters
    from tensorpoly_ds.evaluation import LossWeights, collate_choices, tfew_losses

    model = backbone(shapes, device)
    inject_adapters(model, shipped_adapter("poly_S8_r1"), 1)
    model.train()
    cuda = torch.device(device).type == "cuda"
    out = []
    for task in ADAPT_TASKS:
        rows = task_rows(task, 4 * shapes.batch, seed=1)
        for r in rows:  # the made-up token ids, folded into this model's vocabulary
            r["input_ids"] = [2 + t % (shapes.vocab - 2) for t in r["input_ids"]]
            r["choice_ids"] = [[2 + t % (shapes.vocab - 2) for t in c[:-1]] + [1] for c in r["choice_ids"]]
        order = train_batches(rows, "length_grouped", shapes.batch, 4, seed=0)
        batches = [collate_choices([rows[i] for i in ix], 0).to(device) for ix in order]
        times = {c: [] for c in ADAPT_CHUNKS}
        peak = dict.fromkeys(ADAPT_CHUNKS, 0.0)

        def step(batch, chunk_tokens):
            model.zero_grad(set_to_none=True)
            tfew_losses(model, batch, LossWeights(), chunk_tokens)["loss"].backward()
            if cuda:
                torch.cuda.synchronize()

        for c in ADAPT_CHUNKS:
            step(batches[0], c)  # warm-up
        for i, batch in enumerate(batches * shapes.iters):
            for c in ADAPT_CHUNKS if i % 2 == 0 else ADAPT_CHUNKS[::-1]:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                step(batch, c)
                times[c].append(time.perf_counter() - start)
                if cuda:
                    peak[c] = max(peak[c], torch.cuda.max_memory_allocated() / 2**30)
        row = {"case": f"adapt {task}", "status": "ok", "steps_per_budget": len(times[0])}
        row["step_ms"] = {str(c): 1e3 * statistics.median(t) for c, t in times.items()}
        if cuda:
            row["peak_gb"] = {str(c): v for c, v in peak.items()}
        out.append(row)
    step = model = None
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---- tensorpoly-ds pretrain ------------------------------------------------------------------------------
def run_pretrain(name: str, overrides: list[str], shapes: Shapes, work: Path, cpu: bool, timeout: float) -> dict:
    from benchmarks.bench_memory import prepared_data, run_outputs

    run_dir, peaks = work / name, work / f"{name}.peaks"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "rank_peak.py"),
        str(peaks),
        str(REPO / "launch" / "pretrain.py"),
        "--config",
        str(CONFIGS / "base_t0_3b.yaml"),
        "--config",
        str(CONFIGS / "tensorpoly_i_R8_N2.yaml"),
        "--resume",
        "none",
        f"data.dir={prepared_data(work / 'data')}",
        f"run.dir={run_dir}",
        f"model.name_or_path={shapes.arch}",
        f"train.steps={shapes.pretrain_steps}",
        "train.eval_every=0",
        "train.eval_at_end=false",
        "train.save_every=0",
        "train.log_every=1",
        "train.progress_bar=false",
        *shapes.pretrain_overrides,
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": name, "status": f"timed out after {timeout:.0f} s"}
    row = {
        "case": name,
        "overrides": overrides,
        "wall_s": time.monotonic() - start,
        "exit_code": proc.returncode,
        "status": "ok" if proc.returncode == 0 else "failed: " + proc.stderr[-1500:],
    }
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if "backbone partitioned at load (zero.Init): " in proc.stderr:  # a log line: stderr
        row["backbone_partitioned"] = "partitioned at load (zero.Init): True" in proc.stderr
    for f in sorted(peaks.glob("rank*.json")):
        row["peak"] = json.loads(f.read_text())
    outputs = run_outputs(run_dir)
    steps = outputs.pop("steps")
    if steps:
        steady = steps[2:] or steps  # the first steps include allocation and autotuning
        row["tokens_per_s"] = statistics.median(s["perf/tokens_per_s"] for s in steady)
        row["step_s"] = statistics.median(s["perf/step_time_s"] for s in steady)
        row["final_loss"] = steps[-1]["train/loss"]
    row.update(outputs)
    return row


# ---- report ------------------------------------------------------------------------------------------------
def format_tables(result: dict) -> str:
    lines = [f"{'case':<44}{'step ms':>10}{'tokens/s':>11}{'peak GB':>9}{'trainable':>12}  status"]
    for r in result["cases"]:
        lines.append(
            f"{r['case']:<44}{r.get('step_ms', float('nan')):>10.1f}{r.get('tokens_per_s', float('nan')):>11.0f}"
            f"{r.get('peak_gb', float('nan')):>9.2f}{r.get('trainable_params', 0):>12,}  {r['status'][:60]}"
        )
    lines.append("")
    lines.append(
        f"{'pretrain':<28}{'tokens/s':>10}{'step s':>8}{'GPU GB':>8}{'RSS GB':>8}{'ckpt MB':>9}{'export MB':>10}  status"
    )
    for r in result["pretrain"]:
        peak = r.get("peak", {})
        lines.append(
            f"{r['case']:<28}{r.get('tokens_per_s', float('nan')):>10.0f}{r.get('step_s', float('nan')):>8.3f}"
            f"{peak.get('cuda_max_allocated_mb', float('nan')) / 1024:>8.2f}"
            f"{peak.get('peak_rss_mb', float('nan')) / 1024:>8.2f}{r.get('checkpoint_mb', float('nan')):>9.1f}"
            f"{r.get('export_mb', float('nan')):>10.1f}  {r['status'][:60]}"
        )
    if result.get("adaptation"):
        lines.append("")
        lines.append(f"{'adaptation step ms':<28}" + "".join(f"{'chunks ' + str(c):>14}" for c in ADAPT_CHUNKS))
        for r in result["adaptation"]:
            ms = r.get("step_ms", {})
            cells = "".join(f"{ms.get(str(c), float('nan')):>14.1f}" for c in ADAPT_CHUNKS)
            lines.append(f"{r['case']:<28}{cells}  {r['status'][:60]}")
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    from tpds_common.files import atomic_write_text  # like every project import here: after the environment checks

    atomic_write_text(out, json.dumps(result, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (tests; about a minute)")
    p.add_argument("--wheelhouse", default=str(REPO / "benchmarks" / "gpu" / "wheelhouse"))
    p.add_argument("--site", default="/tmp/tpds_site", help="where the wheelhouse is installed")
    p.add_argument("--work", default="/tmp/tpds_gpu_check", help="prepared data, run directories, logs")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip what would start after this many seconds")
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = p.parse_args(argv)
    began = time.monotonic()
    shapes = CPU_SMOKE if args.cpu_smoke else GPU
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    result = {
        "meta": {"args": vars(args), "shapes": asdict(shapes), "python": platform.python_version()},
        "cases": [],
        "pretrain": [],
        "adaptation": [],
    }
    result["meta"]["installed"] = [] if args.cpu_smoke else ensure_packages(args.wheelhouse, Path(args.site))
    import deepspeed
    import torch
    import transformers

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --cpu-smoke on a machine without one)")
    result["meta"].update(
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        transformers=transformers.__version__,
        peft=importlib.metadata.version("peft") if importlib.util.find_spec("peft") else None,
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
    )
    write(result, out)

    def over_budget() -> bool:
        return time.monotonic() - began > args.budget_s

    for case, kind, spec in cases():
        row = {"case": case, "status": "skipped: time budget"} if over_budget() else None
        if row is None:
            try:
                row = measure_case(case, kind, spec, shapes, device)
            except Exception as err:  # one failing method must not hide the others' numbers
                row = {"case": case, "status": f"failed: {type(err).__name__}: {err}"[:500]}
        result["cases"].append(row)
        print(f"{case}: {row['status']}", flush=True)
        write(result, out)
    for name, overrides in [
        ("zero0_bf16_autocast", ["deepspeed.zero_stage=0", "deepspeed.precision=bf16_autocast"]),
        ("zero3_bf16", ["deepspeed.zero_stage=3", "deepspeed.precision=bf16"]),
    ]:
        left = args.budget_s + 60 - (time.monotonic() - began)
        try:
            row = (
                {"case": name, "status": "skipped: time budget"}
                if left < 60
                else run_pretrain(name, overrides, shapes, work, args.cpu_smoke, timeout=left)
            )
        except subprocess.CalledProcessError as err:  # the data preparation
            row = {"case": name, "status": f"failed: {err}: {(err.stderr or b'')[-1500:]!r}"}
        result["pretrain"].append(row)
        print(f"pretrain {name}: {row['status'][:200]}", flush=True)
        write(result, out)
    try:
        adaptation = (
            [{"case": "adaptation", "status": "skipped: time budget"}]
            if time.monotonic() - began > args.budget_s - 60  # it takes about a minute on T0-3B
            else measure_adaptation(shapes, device)
        )
    except Exception as err:  # reported, like a failing method: the numbers above stand
        adaptation = [{"case": "adaptation", "status": f"failed: {type(err).__name__}: {err}"[:500]}]
    result["adaptation"] = adaptation
    print(f"adaptation: {', '.join(r['status'] for r in adaptation)}", flush=True)
    result["meta"]["wall_s"] = time.monotonic() - began
    write(result, out)
    print(format_tables(result))
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in result["pretrain"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
