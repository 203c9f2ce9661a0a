"""Peak host memory per rank of a T0-3B-shaped ZeRO-3 run on CPU ranks: the shipped settings beside the ones
they replace, in one run.

Each variant runs `tensorpoly-ds pretrain` (launch/pretrain.py under torch.distributed.run, every rank wrapped
by benchmarks/rank_peak.py, which records its exact peak RSS) on random-init T0-3B (vocabulary 32128) with
TensorPoly-I R8 N2 (configs/pretrain/base_t0_3b.yaml + tensorpoly_i_R8_N2.yaml), ZeRO-3, bf16, for a few
steps on the embedded mixture (one row per rank, cut to 32 + 16 tokens), then saves a checkpoint and the
export. Variants:
  shipped            ds_configs/zero3.json and the engine's malloc settings (tensorpoly_ds/engine/allocator.py)
  glibc-malloc       the same with glibc's default malloc (TPDS_MALLOC_TUNING=0)
  live-1e9           the same with stage3_max_live_parameters / stage3_max_reuse_distance 1e9 (the old template)
A watchdog kills a variant whose rank exceeds --max-rss-gb (reported as such) so that a shared machine
survives the settings that do not fit.

    python benchmarks/bench_memory.py                        # shipped only (~12 GB on 2 ranks, minutes)
    python benchmarks/bench_memory.py --variants all --max-rss-gb 11 --out benchmarks/results/memory_t0_3b.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from tpds_common.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "pretrain" / "base_t0_3b.yaml", REPO / "configs" / "pretrain" / "tensorpoly_i_R8_N2.yaml"]
OLD_LIVE = (
    "deepspeed.overrides={zero_optimization: {stage3_max_live_parameters: 1.0e9, stage3_max_reuse_distance: 1.0e9}}"
)
VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "shipped": ({}, []),
    "glibc-malloc": ({"TPDS_MALLOC_TUNING": "0"}, []),
    "live-1e9": ({}, [OLD_LIVE]),
}


def prepared_data(path: Path) -> Path:
    """The embedded mixture prepared at `path` (seconds; kept for the next run)."""
    if not (path / "manifest.json").is_file():
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
                str(path),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    return path


def rank_pids(parent: int) -> list[int]:
    """The rank processes: children of the torch.distributed.run agent."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in children]


def rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_variant(name: str, args, data: Path, work: Path) -> dict:
    env_extra, overrides = VARIANTS[name]
    run_dir, peaks = work / name, work / f"{name}.peaks"
    for d in (run_dir, peaks):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.ranks),
        "--master_port",
        str(args.port),
        str(REPO / "benchmarks" / "rank_peak.py"),
        str(peaks),
        str(REPO / "launch" / "pretrain.py"),
        *[a for c in CONFIGS for a in ("--config", str(c))],
        "--resume",
        "none",
        f"data.dir={data}",
        f"run.dir={run_dir}",
        "model.name_or_path=t0-3b",
        "model.vocab_size=32128",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=bf16",
        f"train.steps={args.steps}",
        f"train.micro_batch={args.micro_batch}",
        "train.grad_accum=1",
        f"data.max_input_len={args.max_input_len}",
        f"data.max_target_len={args.max_target_len}",
        "train.eval_every=0",
        "train.eval_at_end=false",
        "train.save_every=0",
        "train.log_every=1",
        "train.progress_bar=false",
        *overrides,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads), **env_extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    start, killed, sampled = time.monotonic(), None, {}
    log = (work / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill() -> None:  # the ranks run in their own process groups: kill them by pid, then the agent
        for pid in rank_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    try:
        while proc.poll() is None:
            for rank, pid in enumerate(rank_pids(proc.pid)):
                sampled[rank] = max(sampled.get(rank, 0.0), rss_gb(pid))
                if sampled[rank] > args.max_rss_gb and killed is None:
                    killed = f"killed: rank {rank} above {args.max_rss_gb} GB"
                    kill()
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            kill()
        proc.wait()
        log.close()
    row = {
        "variant": name,
        "wall_s": time.monotonic() - start,
        "exit_code": proc.returncode,
        "status": killed or ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}, see {name}.log)"),
    }
    ranks = sorted(peaks.glob("rank*.json"))
    row["peak_rss_gb"] = (
        [json.loads(p.read_text())["peak_rss_mb"] / 1024 for p in ranks]
        if ranks and not killed
        else [sampled[r] for r in sorted(sampled)]
    )
    outputs = run_outputs(run_dir)
    steps = outputs.pop("steps")
    row["step_time_s"] = [s["perf/step_time_s"] for s in steps]
    row["tokens_per_step"] = [s["perf/tokens_per_s"] * s["perf/step_time_s"] for s in steps]
    return dict(row, **outputs)


def run_outputs(run_dir: Path) -> dict:
    """What a finished `tensorpoly-ds pretrain` left: its per-step metrics, the size of its newest checkpoint
    and of its export (and how many tensors the export holds)."""
    metrics = run_dir / "metrics.jsonl"
    out = {
        "steps": [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "train"' in line]
        if metrics.is_file()
        else []
    }
    tags = sorted((run_dir / "checkpoints").glob("step_*"))
    if tags:
        out["checkpoint_mb"] = sum(f.stat().st_size for f in tags[-1].rglob("*") if f.is_file()) / 2**20
    export = run_dir / "export" / "adapter_model.safetensors"
    if export.is_file():
        from safetensors import safe_open

        with safe_open(str(export), "pt") as f:
            out["export_tensors"] = len(list(f.keys()))
        out["export_mb"] = export.stat().st_size / 2**20
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'variant':<14}{'peak RSS per rank (GB)':>26}{'step s':>9}{'ckpt MB':>9}{'export MB':>10}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        peaks = " / ".join(f"{g:.2f}" for g in r["peak_rss_gb"])
        step = f"{r['step_time_s'][-1]:.1f}" if r.get("step_time_s") else "-"
        ckpt = f"{r['checkpoint_mb']:.0f}" if "checkpoint_mb" in r else "-"
        export = f"{r['export_mb']:.0f}" if "export_mb" in r else "-"
        lines.append(f"{r['variant']:<14}{peaks:>26}{step:>9}{ckpt:>9}{export:>10}  {r['status']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="shipped", help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    # bf16 matrix products run at a few GFLOP/s on CPUs without bf16 instructions: one short row per rank keeps
    # a step to minutes; at this size the peak is weights, gathered weights, adapter factors and optimizer state
    p.add_argument("--micro-batch", type=int, default=1, help="rows per rank and step")
    p.add_argument("--max-input-len", type=int, default=32)
    p.add_argument("--max-target-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--max-rss-gb", type=float, default=10.0, help="kill a variant whose rank exceeds this")
    p.add_argument("--port", type=int, default=29671)
    p.add_argument("--work", default="runs/bench_memory", help="run directories and logs")
    p.add_argument("--out", default="benchmarks/results/memory_t0_3b.json")
    args = p.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = prepared_data(work / "data")
    rows = []
    for name in names:
        rows.append(run_variant(name, args, data, work))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows))
    import deepspeed
    import torch

    template = json.loads((REPO / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    from tensorpoly_ds.engine.allocator import SETTINGS

    meta = dict(
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        args=vars(args),
        zero3_template=template,
        malloc={k: v for k, (_, v) in SETTINGS.items()},
        load_average=os.getloadavg(),
    )
    atomic_write_text(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows if r["variant"] == "shipped") else 1


if __name__ == "__main__":
    raise SystemExit(main())
