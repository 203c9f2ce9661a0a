"""Bit-identity of the training loop across two source trees (issue #17, "one training loop").

Runs the same tiny workloads with the code of two trees (each in its own subprocess, PYTHONPATH and cwd set
to that tree) and compares what they wrote, bitwise:

  pretrain   launch/pretrain.py, tiny T5 + Poly, one rank, ZeRO 0, grad_accum 2, 8 steps, evaluation and a
             checkpoint every 4 steps: every train/eval metric of metrics.jsonl except timings and memory
             (perf/*, memory/*), the export's file bytes, the checkpoints' tensor bytes (the raw storages of
             DeepSpeed's torch.save archives, read from the zip without unpickling), rng_rank*.json, meta.json
             without its wall-clock time.
  2 ranks    the same pretraining on 2 CPU ranks (torch.distributed.run), ZeRO 2: the same digests.
  resume     the NEW tree resumes the OLD tree's run directory from its step-4 checkpoint (step 8 deleted):
             metrics of steps 5-8 and the export must equal the old uninterrupted run's (old OUT dirs resume).
  adapt      adaptation jobs from that export, trainer local and engine, modes full / z / mu, one of each
             trainer with 2 multi-task steps first and grad_accum 2: result.json without timings, finish
             time and paths; predictions, routing.safetensors and the saved adapter, byte for byte (adapter_config.json
             without `adapted_from`, the path of the export, which differs between the two work folders).

Usage (from the repository root, DS_ACCELERATOR=cpu):
  python benchmarks/loop_equivalence.py --old /work/main --new . [--out benchmarks/results/loop_equivalence.json]
  python benchmarks/loop_equivalence.py --worker --tree T --data D --work W   (one tree's half; internal)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tpds_common.net import free_port

HERE = Path(__file__).resolve()
PRETRAIN_OVERRIDES = [
    "train.steps=8",
    "train.eval_every=4",
    "train.save_every=4",
    "train.log_every=1",
    "train.keep_checkpoints=3",
    "train.progress_bar=false",
    "data.val_max_samples=32",
]
ADAPT_BASE = dict(
    steps=6, batch_size=4, eval_every=2, eval_batch_size=8, max_eval_examples=12, seed=42, save_adapter=True
)
ADAPT_CASES = {
    f"{trainer}-{mode}": dict(trainer=trainer, mode=mode)
    for trainer in ("local", "engine")
    for mode in ("full", "z", "mu")
}
ADAPT_CASES["local-full-multitask-accum2"] = dict(
    trainer="local", mode="full", multitask_steps=2, multitask_batch_size=4, grad_accum=2, eval_at_start=True
)
ADAPT_CASES["engine-full-multitask-accum2"] = dict(
    trainer="engine", mode="full", multitask_steps=2, multitask_batch_size=4, grad_accum=2, eval_at_start=True
)
VOLATILE_RESULT_KEYS = ("timings", "finished")
PATH_JOB_KEYS = ("out_dir", "data_dir", "export")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_bytes_digest(path: Path) -> str:
    """SHA-256 over the raw tensor storages of a torch.save archive (its data/* records, in name order):
    the saved numbers, whatever the pickled metadata around them holds."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if "/data/" in n and not n.endswith("/"))
        for name in names:
            h.update(name.split("/data/", 1)[1].encode())
            h.update(z.read(name))
    return h.hexdigest()


def files_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def stable(row: dict) -> dict:
    """A metrics record without what varies between identical runs: timings and memory."""
    return {k: v for k, v in row.items() if not k.startswith(("perf/", "memory/"))}


def metric_rows(run_dir: Path) -> list[dict]:
    return [stable(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_digest(ckpt_dir: Path) -> dict:
    out = {}
    for tag in sorted(p for p in ckpt_dir.iterdir() if p.is_dir()):
        entry = {}
        for f in sorted(tag.rglob("*")):
            rel = str(f.relative_to(tag))
            if f.suffix == ".pt":
                entry[rel] = tensor_bytes_digest(f)
            elif f.name.startswith("rng_rank"):
                entry[rel] = sha(f)
            elif f.name == "meta.json":
                meta = json.loads(f.read_text())
                meta.pop("time", None)
                entry[rel] = meta
        out[tag.name] = entry
    return out


def run_checked(cmd: list[str], cwd: Path, env: dict) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def tree_env(tree: Path) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        PYTHONPATH=str(tree),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def pretrain(
    tree: Path, data: Path, run_dir: Path, resume: str = "auto", ranks: int = 1, extra: tuple[str, ...] = ()
) -> None:
    launcher = (
        [sys.executable]
        if ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
        ]
    )
    run_checked(
        [
            *launcher,
            "launch/pretrain.py",
            "--config",
            "configs/pretrain/tiny_cpu.yaml",
            "--resume",
            resume,
            f"data.dir={data}",
            f"run.dir={run_dir}",
            *PRETRAIN_OVERRIDES,
            *extra,
        ],
        cwd=tree,
        env=tree_env(tree),
    )


def pretrain_digest(run_dir: Path) -> dict:
    return {
        "metrics": metric_rows(run_dir),
        "export": files_digest(run_dir / "export"),
        "checkpoints": checkpoint_digest(run_dir / "checkpoints"),
    }


def adapt_digest(out: Path) -> dict:
    result = json.loads((out / "result.json").read_text())
    for key in VOLATILE_RESULT_KEYS:
        result.pop(key, None)
    for key in PATH_JOB_KEYS:
        result["job"].pop(key, None)
    files = {
        name: sha(out / name)
        for name in ("predictions.jsonl", "predictions_best.jsonl", "progress.json", "routing.safetensors")
        if (out / name).is_file()
    }
    if (out / "adapter").is_dir():
        files.update({f"adapter/{k}": v for k, v in files_digest(out / "adapter").items()})
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        config.pop("adapted_from")  # the export's path, which differs between the two trees' work folders
        files["adapter/adapter_config.json"] = config
    return {"result": result, "files": files}


def worker(tree: Path, data: Path, work: Path) -> dict:
    """One tree's half, in a process whose PYTHONPATH is that tree. Each part's digest is kept in
    WORK/digest_<part>.json, so that a rerun does only the parts not yet done."""
    run_dir = work / "pretrain"
    parts = {
        "pretrain": lambda: pretrain_part(tree, data, run_dir),
        "pretrain_zero2_2ranks": lambda: pretrain_part(
            tree, data, work / "pretrain_zero2_2ranks", ranks=2, extra=("deepspeed.zero_stage=2",)
        ),
        "adapt": lambda: adapt_part(data, run_dir / "export", work / "adapt"),
    }
    digest = {}
    for name, run in parts.items():
        path = work / f"digest_{name}.json"
        if not path.is_file():
            path.write_text(json.dumps(run(), indent=1))
        digest[name] = json.loads(path.read_text())
    return digest


def pretrain_part(tree: Path, data: Path, run_dir: Path, ranks: int = 1, extra: tuple[str, ...] = ()) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    pretrain(tree, data, run_dir, ranks=ranks, extra=extra)
    return pretrain_digest(run_dir)


def adapt_part(data: Path, export: Path, work: Path) -> dict:
    from data_prep.manifest import read_manifest
    from tensorpoly_ds.adapt.job import AdaptJob, run_job

    shutil.rmtree(work, ignore_errors=True)
    task = read_manifest(data).held_out[0]
    digest = {}
    for name, case in ADAPT_CASES.items():
        out = work / name
        job = AdaptJob(out_dir=str(out), data_dir=str(data), task=task, export=str(export), **{**ADAPT_BASE, **case})
        result = run_job(job)  # its messages go to the project logger (stderr)
        if result["status"] != "complete":
            raise SystemExit(f"{name}: status {result['status']}")
        digest[name] = adapt_digest(out)
    return digest


def cross_resume(old_run: Path, new_tree: Path, data: Path, work: Path) -> dict:
    """The new tree resumes the old tree's run from its step-4 checkpoint."""
    run_dir = work / "resumed"
    shutil.copytree(old_run, run_dir)
    tags = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert [t.name for t in tags] == ["step_00000004", "step_00000008"], tags
    shutil.rmtree(tags[-1])
    shutil.rmtree(run_dir / "export")
    (run_dir / "metrics.jsonl").write_text("")  # only the resumed steps' records count
    pretrain(new_tree, data, run_dir)
    return {"metrics": [r for r in metric_rows(run_dir) if r["step"] > 4], "export": files_digest(run_dir / "export")}


def tree_version(tree: Path) -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=tree, capture_output=True, text=True, check=False).stdout.strip()

    return {
        "path": str(tree),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain", "--untracked-files=no").splitlines(),
    }


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} entries"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    # floats compared through their JSON text (repr round-trips every bit), NaN equal to NaN
    return [] if json.dumps(a) == json.dumps(b) else [f"{where}: {a!r} vs {b!r}"]


def prepare(tree: Path, data: Path) -> None:
    run_checked(
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
            str(data),
            "--few-shot-k",
            "4",
        ],
        cwd=tree,
        env=tree_env(tree),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path)
    ap.add_argument("--new", type=Path, default=HERE.parents[1])
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "loop_equivalence.json")
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--tree", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(args.tree.resolve()))  # that tree's packages, not this script's tree
        digest = worker(args.tree.resolve(), args.data, args.work)
        (args.work / "digest.json").write_text(json.dumps(digest, indent=1))
        return
    if args.old is None:
        ap.error("--old TREE is required")
    work = args.keep or Path(tempfile.mkdtemp(prefix="loop_equivalence_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        prepare(args.new.resolve(), data)
    digests = {}
    for side, tree in (("old", args.old.resolve()), ("new", args.new.resolve())):
        side_work = work / side
        if not (side_work / "digest.json").exists():
            side_work.mkdir(exist_ok=True)
            run_checked(
                [
                    sys.executable,
                    str(HERE),
                    "--worker",
                    "--tree",
                    str(tree),
                    "--data",
                    str(data),
                    "--work",
                    str(side_work),
                ],
                cwd=tree,
                env=tree_env(tree),
            )
        digests[side] = json.loads((side_work / "digest.json").read_text())
        for run in ("pretrain", "pretrain_zero2_2ranks"):
            digests[side][run]["metrics"] = [stable(r) for r in digests[side][run]["metrics"]]
    shutil.rmtree(work / "resume", ignore_errors=True)
    (work / "resume").mkdir()
    resumed = cross_resume(work / "old" / "pretrain", args.new.resolve(), data, work / "resume")
    old_tail = {
        "metrics": [r for r in digests["old"]["pretrain"]["metrics"] if r["step"] > 4],
        "export": digests["old"]["pretrain"]["export"],
    }
    report = {
        "old": tree_version(args.old),
        "new": tree_version(args.new),
        "pretrain": differences(digests["old"]["pretrain"], digests["new"]["pretrain"]),
        "pretrain_zero2_2ranks": differences(
            digests["old"]["pretrain_zero2_2ranks"], digests["new"]["pretrain_zero2_2ranks"]
        ),
        "resume_old_run_with_new_code": differences(old_tail, resumed),
        "adapt": {
            name: differences(digests["old"]["adapt"][name], digests["new"]["adapt"].get(name, {}))
            for name in ADAPT_CASES
        },
        "compared": {
            "pretrain_metric_rows": len(digests["old"]["pretrain"]["metrics"]),
            "checkpoint_tags": sorted(digests["old"]["pretrain"]["checkpoints"]),
            "adapt_jobs": sorted(ADAPT_CASES),
        },
    }
    identical = (
        not report["pretrain"]
        and not report["pretrain_zero2_2ranks"]
        and not report["resume_old_run_with_new_code"]
        and not any(report["adapt"].values())
    )
    report["bit_identical"] = identical
    from tpds_common.files import atomic_write_json

    atomic_write_json(args.out, report)
    print(
        f"pretrain (metrics, export, checkpoints): {'identical' if not report['pretrain'] else report['pretrain'][:5]}"
    )
    print(
        f"pretrain, 2 ranks ZeRO-2:               "
        f"{'identical' if not report['pretrain_zero2_2ranks'] else report['pretrain_zero2_2ranks'][:5]}"
    )
    print(
        f"old run resumed by new code:            "
        f"{'identical' if not report['resume_old_run_with_new_code'] else report['resume_old_run_with_new_code'][:5]}"
    )
    for name, diff in report["adapt"].items():
        print(f"adapt {name:30s}            {'identical' if not diff else diff[:5]}")
    print(f"wrote {args.out}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        sys.path.insert(0, str(HERE.parents[1]))
    main()
