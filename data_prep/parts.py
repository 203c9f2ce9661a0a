"""The unit of work: one training config, or one held-out task, read -> validated -> tokenised ->
written to an Arrow part file in the part cache, a bounded chunk at a time.

Parts run in worker processes (`--num-proc`), in any order; each is committed atomically
(a temporary folder renamed into place, part.json written last) under a key that covers
everything it depends on: the source files' fingerprints, the tokenizer's identity and the
options that shape it. A rerun after a crash, or after editing one source file, rebuilds only
the parts whose key changed; the final splits are assembled from the parts in task order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from . import fewshot
from .errors import ReadError
from .mixture import CapRule
from .readers import SplitFiles
from .records import validate_chunks

PART_VERSION = 1
PART_JSON = "part.json"
IDS = pa.list_(pa.int32())
TRAIN_SCHEMA = pa.schema([("input_ids", IDS), ("target_ids", IDS)])
EVAL_SCHEMA = pa.schema(
    [
        ("template", pa.string()),
        ("example_id", pa.int64()),
        ("label", pa.int32()),
        ("input_ids", IDS),
        ("choice_ids", pa.list_(IDS)),
    ]
)
FEW_SCHEMA = EVAL_SCHEMA.append(pa.field("target_ids", IDS))


@dataclass(frozen=True)
class TrainPart:
    task: str
    sf: SplitFiles
    n_templates: int
    cap: CapRule
    val_per_template: int

    @property
    def name(self) -> str:
        return f"train--{self.task}"


@dataclass(frozen=True)
class HeldOutPart:
    task: str
    eval_sfs: tuple[tuple[str, SplitFiles], ...]  # (template, split files), template order
    pool_sfs: tuple[tuple[str, SplitFiles], ...]
    k: int
    seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"heldout--{self.task}"


def split_rows(n: int, cap: CapRule, n_templates: int, val_per_template: int) -> tuple[range, range]:
    """Training rows train[0:min(cap, n - v)] and validation rows, the last v = min(val, n // 2)."""
    v = min(val_per_template, n // 2)
    return range(0, min(cap.cap(n, n_templates), n - v)), range(n - v, n)


class PartCache:
    def __init__(self, root: Path):
        self.root = root

    def entry(self, name: str) -> Path:
        return self.root / name

    def load(self, name: str) -> dict | None:
        try:
            return json.loads((self.entry(name) / PART_JSON).read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def new_tmp(self, name: str) -> Path:
        tmp = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, name: str, tmp: Path, meta: dict) -> None:
        (tmp / PART_JSON).write_text(json.dumps(meta), "utf-8")
        dest = self.entry(name)
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            # A leftover worker of a killed run committed the same part in the meantime.
            if (self.load(name) or {}).get("key") != meta["key"]:
                raise

    def prune(self, keep: set[str]) -> None:
        """Drop entries no longer used and temporary folders of interrupted runs."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _key(common: str, job, fingerprints: list[list[dict]]) -> str:
    contents = [[(f["file"], f.get("sha256")) for f in fps] for fps in fingerprints]
    job_body = json.loads(json.dumps(asdict(job), default=str))
    return hashlib.sha256(json.dumps([PART_VERSION, common, job_body, contents], sort_keys=True).encode()).hexdigest()


class _Stream:
    """An Arrow IPC stream file written batch by batch."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema = schema
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self.rows = 0

    def write(self, columns: list) -> None:
        batch = pa.record_batch(columns, schema=self.schema)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


def read_part(path: Path):
    """Record batches of a part file, read (not memory-mapped) one at a time."""
    with pa.OSFile(str(path), "rb") as f:
        reader = pa.ipc.open_stream(f)
        for batch in reader:
            yield batch


class Worker:
    """Runs parts. One per process; holds the source, the encoder and the cache."""

    def __init__(self, source, encoder, cache: PartCache, common_key: str, skip_invalid: bool):
        self.source, self.encoder, self.cache = source, encoder, cache
        self.common_key, self.skip_invalid = common_key, skip_invalid

    def run(self, job) -> dict:
        cached = self.cache.load(job.name)
        previous = cached.get("sources") if cached else None
        sfs = [job.sf] if isinstance(job, TrainPart) else [sf for _, sf in job.eval_sfs + job.pool_sfs]
        prev_flat = [fp for fps in (previous or []) for fp in fps]
        fingerprints = [self.source.fingerprints(sf, prev_flat) for sf in sfs]
        key = _key(self.common_key, job, fingerprints)
        if cached and cached.get("key") == key:
            return {**cached["stats"], "reused": True, "sources": fingerprints}
        tmp = self.cache.new_tmp(job.name)
        try:
            stats = self._train(job, tmp) if isinstance(job, TrainPart) else self._held_out(job, tmp)
            self.cache.commit(job.name, tmp, {"key": key, "sources": fingerprints, "stats": stats})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {**stats, "reused": False, "sources": fingerprints}

    def _empty(self, sf: SplitFiles, what: str, empty: list) -> None:
        if not self.skip_invalid:
            raise ReadError(
                ", ".join(sf.files),
                sf.config,
                f"split {sf.split!r}",
                f"{what} is empty (0 rows); pass --skip-invalid to skip it (listed in the manifest)",
                reason="empty",
            )
        empty.append(f"{sf.config}/{sf.split}")

    def _train(self, job: TrainPart, tmp: Path) -> dict:
        reader = self.source.open(job.sf)
        n = reader.num_rows()
        empty: list[str] = []
        if n == 0:
            self._empty(job.sf, "the training split", empty)
        stats = {"rows": {}, "truncated": {}, "skipped": {}, "empty": empty, "source_rows": n}
        for label, rows in zip(("train", "val"), split_rows(n, job.cap, job.n_templates, job.val_per_template)):
            out, skipped, cut = _Stream(tmp / f"{label}.arrow", TRAIN_SCHEMA), Counter(), Counter()
            for recs in validate_chunks(reader.chunks(rows), job.task, label, skipped, skip_invalid=self.skip_invalid):
                if not recs:
                    continue
                enc = self.encoder.train_batch(recs.inputs, recs.targets)
                out.write([enc["input_ids"], enc["target_ids"]])
                cut["input"] += int(enc["input_truncated"].sum())
                cut["target"] += int(enc["target_truncated"].sum())
            out.close()
            stats["rows"][label] = out.rows
            stats["truncated"][label] = {"input": cut["input"], "target": cut["target"]}
            if skipped:
                stats["skipped"][f"{job.task}/{label}"] = dict(sorted(skipped.items()))
        return stats

    def _held_out(self, job: HeldOutPart, tmp: Path) -> dict:
        """The evaluation rows of every template, then the few-shot rows each seed samples from the pool."""
        empty: list[str] = []
        skipped: dict[str, dict] = {}
        eval_stats, eval_ids = self._write_eval(job, tmp, empty, skipped)
        pool = self._scan_pool(job, empty, skipped)
        cands = _few_shot_candidates(job, pool, eval_ids)
        picks = {s: fewshot.sample(job.task, s, sorted(cands), job.k) for s in job.seeds}
        few_cut = self._write_few(job, tmp, pool, set().union(*picks.values()))
        return {
            "eval": eval_stats,
            "skipped": skipped,
            "empty": empty,
            "few_shot": {
                "k": job.k,
                "seeds": list(job.seeds),
                "source_split": dict(job.pool_sfs)[job.pool_sfs[0][0]].split,
                "templates": pool.templates,
                "templates_excluded": [t for t, _ in job.pool_sfs if t not in pool.templates],
                "candidates": len(cands),
                "example_ids": {str(s): ids for s, ids in picks.items()},
            },
            "few_truncated": {"input": few_cut["input"], "target": few_cut["target"]},
        }

    def _write_eval(self, job: HeldOutPart, tmp: Path, empty: list, skipped: dict) -> tuple[dict, set[int]]:
        """eval.arrow: every valid row of every template; its stats and the example ids it holds."""
        cut = Counter()
        out = _Stream(tmp / "eval.arrow", EVAL_SCHEMA)
        eval_ids: set[int] = set()
        for template, sf in job.eval_sfs:
            reader = self.source.open(sf)
            n = reader.num_rows()
            if n == 0:
                self._empty(sf, "the evaluation split", empty)
            counter = Counter()
            for recs in validate_chunks(
                reader.chunks(range(n)),
                sf.config,
                sf.split,
                counter,
                require_choices=True,
                skip_invalid=self.skip_invalid,
            ):
                if not recs:
                    continue
                enc = self.encoder.choice_batch(recs.inputs, recs.choices, recs.labels)
                out.write(
                    [
                        pa.array([template] * len(recs)),
                        pa.array(recs.example_ids, pa.int64()),
                        pa.array(recs.labels, pa.int32()),
                        enc["input_ids"],
                        enc["choice_ids"],
                    ]
                )
                cut["input"] += int(enc["input_truncated"].sum())
                cut["target"] += int(enc["target_truncated"].sum())
                eval_ids.update(recs.example_ids)
            if counter:
                skipped[f"{sf.config}/{sf.split}"] = dict(sorted(counter.items()))
        out.close()
        if out.rows == 0:
            raise ReadError(
                ", ".join(f for _, sf in job.eval_sfs for f in sf.files),
                job.task,
                "all templates",
                "no evaluation rows are left for this held-out task",
                reason="empty",
            )
        return {"rows": out.rows, "examples": len(eval_ids), "truncated": dict(cut)}, eval_ids

    def _scan_pool(self, job: HeldOutPart, empty: list, skipped: dict) -> _Pool:
        """The few-shot pool's sizes and valid ids (no text kept), and which templates can give shots."""
        sizes, valid, readers = {}, {}, {}
        for template, sf in job.pool_sfs:
            readers[template] = reader = self.source.open(sf)
            sizes[template] = n = reader.num_rows()
            if n == 0:
                self._empty(sf, "the few-shot pool", empty)
                continue
            counter, ids = Counter(), set()
            for recs in validate_chunks(
                reader.chunks(range(n)),
                sf.config,
                sf.split,
                counter,
                require_choices=True,
                skip_invalid=self.skip_invalid,
            ):
                ids.update(recs.example_ids)
            valid[template] = ids
            if counter:
                skipped[f"{sf.config}/{sf.split}"] = dict(sorted(counter.items()))
        # example_id is the row index inside a config; only templates rendering the full split
        # (same row count) index the same examples, so only those are used for few-shot rows.
        full = max(sizes.values()) if sizes else 0
        templates = [t for t, _ in job.pool_sfs if sizes[t] == full and full > 0]
        return _Pool(templates, full, valid, readers)

    def _write_few(self, job: HeldOutPart, tmp: Path, pool: _Pool, needed: set) -> Counter:
        """few.arrow: the sampled examples' rows of every pool template; returns the truncation counts."""
        few = _Stream(tmp / "few.arrow", FEW_SCHEMA)
        few_cut = Counter()
        sf_of = dict(job.pool_sfs)
        for template in pool.templates:
            for recs in validate_chunks(
                pool.readers[template].chunks(range(pool.full)),
                sf_of[template].config,
                sf_of[template].split,
                Counter(),
                require_choices=True,
                skip_invalid=True,
            ):
                keep = [i for i, e in enumerate(recs.example_ids) if e in needed]
                if not keep:
                    continue
                enc = self.encoder.choice_batch(
                    [recs.inputs[i] for i in keep], [recs.choices[i] for i in keep], [recs.labels[i] for i in keep]
                )
                few.write(
                    [
                        pa.array([template] * len(keep)),
                        pa.array([recs.example_ids[i] for i in keep], pa.int64()),
                        pa.array([recs.labels[i] for i in keep], pa.int32()),
                        enc["input_ids"],
                        enc["choice_ids"],
                        enc["target_ids"],
                    ]
                )
                few_cut["input"] += int(enc["input_truncated"].sum())
                few_cut["target"] += int(enc["target_truncated"].sum())
        few.close()
        return few_cut


@dataclass
class _Pool:
    """A held-out task's few-shot pool after the scan: the templates that render the full split (`full` rows),
    each template's valid example ids and its open reader."""

    templates: list[str]
    full: int
    valid: dict[str, set]
    readers: dict


def _few_shot_candidates(job: HeldOutPart, pool: _Pool, eval_ids: set[int]) -> set:
    """Example ids valid in every full template, minus the evaluation rows when the pool is the same split."""
    cands = set.intersection(*(pool.valid[t] for t in pool.templates)) if pool.templates else set()
    eval_split = {sf.split for _, sf in job.eval_sfs}
    if pool.templates and dict(job.pool_sfs)[pool.templates[0]].split in eval_split:  # keep eval rows out of shots
        cands -= eval_ids
    if not cands:
        raise ReadError(
            ", ".join(f for _, sf in job.pool_sfs for f in sf.files),
            job.task,
            "few-shot pool",
            f"no usable few-shot candidates (templates with the full pool: {pool.templates})",
            reason="empty",
        )
    return cands


# Worker-process plumbing: one Worker per process, built once by the pool initializer.
_WORKER: Worker | None = None


def _exit_with_parent() -> None:
    """A worker whose parent died (kill -9 of the prep) stops instead of running on as an orphan."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def init_worker(
    source,
    backend_json: str,
    eos_token_id: int,
    max_input_len: int,
    max_target_len: int,
    cache_root: str,
    common_key: str,
    skip_invalid: bool,
) -> None:
    global _WORKER
    # The workers are the parallelism; Rust-side threads on top would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _exit_with_parent()
    from .tokenizer import Encoder, load_backend

    encoder = Encoder(load_backend(backend_json), eos_token_id, max_input_len, max_target_len)
    _WORKER = Worker(source, encoder, PartCache(Path(cache_root)), common_key, skip_invalid)


def run_in_worker(job) -> tuple[str, dict]:
    return job.name, _WORKER.run(job)
