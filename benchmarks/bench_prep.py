"""Data prep: throughput against the raw tokenizer, peak memory against rows, and a kill/resume run.

Everything runs on a generated P3-format dump (a replica of the bigscience/P3 snapshot layout:
README card + per-config Parquet files) with a 32k-piece Unigram tokenizer trained on it. One
row = one P3 record (input ~100 words, short target). Rows/s and MB/s (UTF-8 bytes of input +
target) are measured over the whole `python -m data_prep` command, start-up and assembly included.
  * raw: the same tokenizer called directly on the same texts, batches of 1000, in one process:
    `tok(texts, add_special_tokens=False)` (the usual call) and the backend's encode_batch_fast;
  * prep with --num-proc 1 and 2; ratio = prep rows/s per process / raw rows/s;
  * peak RSS of the whole process tree (prep + its workers), sampled every 0.1 s, at several sizes;
  * --scale N: prep of an N-row dump with --num-proc 2, killed (SIGKILL to the process group) once
    half of its parts are in the cache, then rerun: it must resume, and both runs' peak RSS is reported.
TOKENIZERS_PARALLELISM=false everywhere, so one process is one core.

Usage:
  python benchmarks/bench_prep.py [--quick] [--out benchmarks/results/prep.json]
  python benchmarks/bench_prep.py --scale 1000000 --out benchmarks/results/prep_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.mixture import get_mixture, load_t0_tasks  # noqa: E402
from data_prep.p3_replica import write_replica  # noqa: E402

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
VOCAB = 32000


def _words(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(n)]


def generate_dump(root: Path, n_rows: int, n_configs: int, seed: int = 0) -> tuple[Path, list[str], int]:
    """A snapshot-layout dump: n_configs T0 training configs sharing n_rows, plus RTE's held-out configs.
    Returns (root, training configs, text bytes of the training rows)."""
    rng = random.Random(seed)
    vocab = _words(60000, rng)
    cum, acc = [], 0.0
    for i in range(len(vocab)):  # Zipf-like word frequencies
        acc += 1.0 / (i + 10)
        cum.append(acc)
    mix = get_mixture("t0_train")
    configs = [t.task for t in mix.train[:n_configs]]
    per = n_rows // n_configs
    text_bytes = 0

    def row(n_words: int, choices=None) -> dict:
        words = rng.choices(vocab, cum_weights=cum, k=n_words)
        target = (
            " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(1, 8)))
            if choices is None
            else rng.choice(choices)
        )
        r = {"inputs_pretokenized": " ".join(words) + " ?", "targets_pretokenized": target, "inputs": [], "targets": []}
        if choices is not None:
            r["answer_choices"] = choices
        return r

    done = root / "GENERATED.json"  # written last: a complete dump of these sizes is reused
    if done.is_file() and json.loads(done.read_text()) == {"rows": n_rows, "configs": n_configs, "seed": seed}:
        return root, configs, json.loads((root / "TEXT_BYTES").read_text())
    if root.exists():
        shutil.rmtree(root)
    for c in configs:
        rows = [row(rng.randint(40, 160)) for _ in range(per)]
        text_bytes += sum(
            len(r["inputs_pretokenized"].encode()) + len(r["targets_pretokenized"].encode()) for r in rows
        )
        # One config at a time: the generator itself must not hold the whole dump.
        _append(root, {c: {"train": rows}})
    _append(
        root,
        {
            c: {
                "train": [row(30, ["yes", "no"]) for _ in range(300)],
                "validation": [row(30, ["yes", "no"]) for _ in range(100)],
            }
            for _, c in mix.held_out_task("rte").templates
        },
    )
    (root / "TEXT_BYTES").write_text(json.dumps(text_bytes))
    done.write_text(json.dumps({"rows": n_rows, "configs": n_configs, "seed": seed}))
    return root, configs, text_bytes


def _append(root: Path, data: dict) -> None:
    """Add configs to a replica (the card is rewritten with every config's entry)."""
    import yaml

    from data_prep.p3_replica import write_parquet_config

    if not (root / "README.md").is_file():
        write_replica(root, data, script=False)
        return
    card = (root / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    for c, splits in data.items():
        entry = write_parquet_config(root, c, splits)
        meta["dataset_info"].append(entry["dataset_info"])
        meta["configs"].append(entry["configs"])
    (root / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n# Dataset Card for P3\n")


def train_tokenizer(dump: Path, out: Path, sample_rows: int = 20000) -> Path:
    """32k-piece Unigram (Metaspace pre-tokenizer, T5's special ids) trained on the dump's text."""
    if (out / "tokenizer.json").is_file():
        return out
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for f in sorted(dump.glob("*/train-*.parquet")):
        texts += pq.read_table(f, columns=["inputs_pretokenized"]).column(0).to_pylist()[: sample_rows // 8]
        if len(texts) >= sample_rows:
            break
    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=1 << 30
    ).save_pretrained(str(out))
    return out


def raw_throughput(dump: Path, configs: list[str], tok_dir: Path) -> dict:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    inputs, targets = [], []
    for c in configs:
        for f in sorted((dump / c).glob("train-*.parquet")):
            t = pq.read_table(f, columns=["inputs_pretokenized", "targets_pretokenized"])
            inputs += t.column(0).to_pylist()
            targets += t.column(1).to_pylist()
    nbytes = sum(len(s.encode()) for s in inputs) + sum(len(s.encode()) for s in targets)
    out = {}
    backend = tok.backend_tokenizer
    calls = {
        "hf_call": lambda b: tok(b, add_special_tokens=False)["input_ids"],
        "encode_batch_fast": lambda b: [e.ids for e in backend.encode_batch_fast(b, add_special_tokens=False)],
    }
    for name, fn in calls.items():
        start = time.perf_counter()
        for i in range(0, len(inputs), 1000):
            fn(inputs[i : i + 1000])
            fn(targets[i : i + 1000])
        sec = time.perf_counter() - start
        out[name] = {
            "rows": len(inputs),
            "seconds": round(sec, 2),
            "rows_per_s": round(len(inputs) / sec, 1),
            "mb_per_s": round(nbytes / sec / 1e6, 3),
        }
    return out


class PeakRSS:
    """Peak summed RSS of a process and its descendants, sampled every 0.1 s."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def prep_args(dump: Path, out: Path, tok_dir: Path, configs: list[str], num_proc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "data_prep",
        "--mixture",
        "t0_train",
        "--source",
        f"local:{dump}",
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--train-tasks",
        ",".join(configs),
        "--held-out",
        "rte",
        "--cap-per-template",
        "none",
        "--val-per-template",
        "100",
        "--num-proc",
        str(num_proc),
        "--overwrite",
    ]


def run_prep(args: list[str], kill_when=None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    rss = PeakRSS(proc.pid)
    killed = False
    if kill_when is not None:
        while proc.poll() is None:
            if kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
    _, err = proc.communicate()
    sec = time.perf_counter() - start
    peak = rss.stop()
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"prep failed ({proc.returncode}):\n{err[-3000:]}")
    lines = [line.removeprefix("[prep] ") for line in err.splitlines()]  # prep's log lines (stderr)
    reused = next((int(line.split()[1]) for line in lines if line.startswith("reused ")), 0)
    # "parts: B built, R reused, N rows in S s (X rows/s)": the steady state, without start-up and assembly.
    parts = next((line for line in lines if line.startswith("parts: ")), None)
    parts_rate = float(parts.rsplit("(", 1)[1].split()[0]) if parts else None
    return {
        "seconds": round(sec, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "killed": killed,
        "parts_reused": reused,
        "parts_rows_per_s": parts_rate,
    }


def fresh(out: Path) -> None:
    for p in (out, out.parent / f".{out.name}.prep"):
        shutil.rmtree(p, ignore_errors=True)


def throughput(work: Path, rows: int, n_configs: int) -> dict:
    dump, configs, nbytes = generate_dump(work / f"dump_{rows}", rows, n_configs)
    tok_dir = train_tokenizer(dump, work / "tokenizer")
    raw = raw_throughput(dump, configs, tok_dir)
    res = {"rows": rows, "configs": n_configs, "text_mb": round(nbytes / 1e6, 2), "raw": raw, "prep": {}}
    for n in (1, 2):
        out = work / f"out_{rows}_{n}"
        fresh(out)
        r = run_prep(prep_args(dump, out, tok_dir, configs, n))
        r["rows_per_s"] = round(rows / r["seconds"], 1)
        r["mb_per_s"] = round(nbytes / r["seconds"] / 1e6, 3)
        r["per_process_vs_raw_hf_call"] = round(r["rows_per_s"] / n / raw["hf_call"]["rows_per_s"], 3)
        r["per_process_vs_raw_encode_fast"] = round(r["rows_per_s"] / n / raw["encode_batch_fast"]["rows_per_s"], 3)
        r["parts_per_process_vs_raw_hf_call"] = round(r["parts_rows_per_s"] / n / raw["hf_call"]["rows_per_s"], 3)
        res["prep"][str(n)] = r
        fresh(out)
    res["speedup_2_vs_1"] = round(res["prep"]["2"]["rows_per_s"] / res["prep"]["1"]["rows_per_s"], 3)
    res["parts_speedup_2_vs_1"] = round(res["prep"]["2"]["parts_rows_per_s"] / res["prep"]["1"]["parts_rows_per_s"], 3)
    return res


def memory_curve(work: Path, sizes: list[int], n_configs: int) -> list[dict]:
    out_rows = []
    for rows in sizes:
        dump, configs, nbytes = generate_dump(work / f"dump_{rows}", rows, n_configs)
        tok_dir = train_tokenizer(dump, work / "tokenizer")
        out = work / f"mem_{rows}"
        fresh(out)
        r = run_prep(prep_args(dump, out, tok_dir, configs, 1))
        out_rows.append(
            {"rows": rows, "text_mb": round(nbytes / 1e6, 2), "peak_rss_mb": r["peak_rss_mb"], "seconds": r["seconds"]}
        )
        fresh(out)
    return out_rows


def scale_run(work: Path, rows: int, n_configs: int, num_proc: int) -> dict:
    dump, configs, nbytes = generate_dump(work / f"dump_{rows}", rows, n_configs)
    tok_dir = train_tokenizer(dump, work / "tokenizer")
    out = work / "scale_out"
    fresh(out)
    parts = out.parent / f".{out.name}.prep" / "parts"
    half = (n_configs + 1) // 2
    cached = lambda: parts.is_dir() and sum(1 for p in parts.iterdir() if not p.name.startswith(".")) >= half
    first = run_prep(prep_args(dump, out, tok_dir, configs, num_proc), kill_when=cached)
    second = run_prep(prep_args(dump, out, tok_dir, configs, num_proc))
    manifest = json.loads((out / "manifest.json").read_text())
    res = {
        "rows": rows,
        "configs": n_configs,
        "num_proc": num_proc,
        "text_mb": round(nbytes / 1e6, 2),
        "killed_run": first,
        "resumed_run": second,
        "train_rows_written": manifest["counts"]["totals"]["train"],
        "val_rows_written": manifest["counts"]["totals"]["val"],
        "peak_rss_mb": max(first["peak_rss_mb"], second["peak_rss_mb"]),
    }
    fresh(out)
    return res


def t0_train_rows() -> int:
    """Training rows of the full t0_train mixture under the default cap (T-Few/mttl slice rule)."""
    total = 0
    for ds in load_t0_tasks()["train_mixture"]:
        n = len([t for t in ds["templates"] if not t["blacklisted"]])
        total += n * min(ds["train_size_datasets_csv"], 500_000 // n)
    return total


def table(res: dict) -> str:
    lines = []
    if "throughput" in res:
        t = res["throughput"]
        lines.append(f"throughput on {t['rows']} rows / {t['configs']} configs ({t['text_mb']} MB of text)")
        lines.append(
            f"{'what':34s} {'rows/s':>10s} {'MB/s':>8s} {'per proc vs raw':>16s} "
            f"{'parts rows/s':>13s} {'parts vs raw':>13s} {'peak RSS MB':>12s}"
        )
        for name, r in t["raw"].items():
            lines.append(f"{'raw tokenizer: ' + name:34s} {r['rows_per_s']:10.1f} {r['mb_per_s']:8.3f}")
        for n, r in t["prep"].items():
            lines.append(
                f"{'prep --num-proc ' + n:34s} {r['rows_per_s']:10.1f} {r['mb_per_s']:8.3f} "
                f"{r['per_process_vs_raw_hf_call']:16.3f} {r['parts_rows_per_s']:13.1f} "
                f"{r['parts_per_process_vs_raw_hf_call']:13.3f} {r['peak_rss_mb']:12.1f}"
            )
        lines.append(
            f"speedup --num-proc 2 vs 1: {t['speedup_2_vs_1']}x whole command, {t['parts_speedup_2_vs_1']}x parts phase"
        )
    if "memory" in res:
        lines.append("")
        lines.append(f"{'rows':>10s} {'text MB':>10s} {'peak RSS MB':>12s} {'seconds':>9s}")
        for r in res["memory"]:
            lines.append(f"{r['rows']:10d} {r['text_mb']:10.2f} {r['peak_rss_mb']:12.1f} {r['seconds']:9.1f}")
    if "scale" in res:
        s = res["scale"]
        lines.append("")
        lines.append(
            f"scale: {s['rows']} rows, {s['configs']} configs, --num-proc {s['num_proc']}: killed after "
            f"{s['killed_run']['seconds']} s, resumed run {s['resumed_run']['seconds']} s reusing "
            f"{s['resumed_run']['parts_reused']} parts; peak RSS {s['peak_rss_mb']} MB; "
            f"{s['train_rows_written']} train + {s['val_rows_written']} val rows written"
        )
    if "extrapolation" in res:
        e = res["extrapolation"]
        lines.append("")
        lines.append(
            f"full t0_train ({e['t0_train_rows']} rows) on 32 processes: ~{e['minutes_on_32_procs']} min "
            f"(from {e['rows_per_s_per_process']} rows/s per process)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, minutes)")
    ap.add_argument("--scale", type=int, default=0, help="rows of the kill/resume run (e.g. 1000000); skips the rest")
    ap.add_argument("--num-proc", type=int, default=2, help="processes of the scale run")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prep.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    res = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "tokenizer": f"Unigram, {VOCAB} pieces, trained on the generated text",
    }
    if args.scale:
        res["scale"] = scale_run(work, args.scale, 40, args.num_proc)
    else:
        rows, sizes, n_configs = (
            (40_000, [10_000, 40_000, 160_000], 8) if args.quick else (200_000, [25_000, 100_000, 400_000], 16)
        )
        res["throughput"] = throughput(work, rows, n_configs)
        res["memory"] = memory_curve(work, sizes, n_configs)
        per_proc = res["throughput"]["prep"]["1"]["rows_per_s"]
        res["extrapolation"] = {
            "t0_train_rows": t0_train_rows(),
            "rows_per_s_per_process": per_proc,
            "minutes_on_32_procs": round(t0_train_rows() / (per_proc * 32) / 60, 1),
        }
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
