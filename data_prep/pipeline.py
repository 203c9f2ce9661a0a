"""Orchestration: resolve the request, lock DIR, run the parts (cached), assemble atomically.

Order matters for the user: every cheap check (names, options, the lock, every config's files,
the state of DIR) runs before any data is read. Then each training config and each held-out
task is one part (parts.py): read, validated and tokenised a bounded chunk at a time, in
`--num-proc` worker processes, and cached. Finally the splits are assembled from the parts in
task order in a staging folder that replaces DIR in one rename, with the manifest written last.
Memory stays at about one chunk per worker plus the part being copied, whatever the mixture size.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tpds_common.config import apply_overrides, check_fields, load_files
from tpds_common.locking import FolderLock, LockHeld
from tpds_common.log import get_logger, progress

from . import tokenizer as toklib
from .errors import ConfigError, OutputBusy, unknown_name
from .manifest import FORMAT_VERSION, Manifest, ManifestError, read_manifest
from .mixture import CapRule, HeldOutTask, Mixture, TrainTemplate, get_mixture
from .parts import FEW_SCHEMA, HeldOutPart, PartCache, TrainPart, Worker, read_part, split_rows
from .records import REASONS, validate_chunks
from .sources import HubSource, parse_source
from .writer import MANIFEST, Staging, content_hash, write_json_atomic, write_split

log = get_logger("prep")

DEFAULT_SEEDS = (0, 1024, 42)
SOURCES_RECORD = "sources.json"  # in the work folder: the last build's fingerprints with mtimes


@dataclass(frozen=True)
class PrepConfig:
    mixture: str
    source: str
    tokenizer: str
    out: Path
    num_shards: int = 4
    num_proc: int = 1
    max_input_len: int = 256
    max_target_len: int = 256
    cap_per_template: str | None = None
    val_per_template: int = 100
    few_shot_seeds: tuple[int, ...] = DEFAULT_SEEDS
    few_shot_k: int | None = None
    train_tasks: tuple[str, ...] | None = None
    held_out: tuple[str, ...] | None = None
    skip_invalid: bool = False
    overwrite: bool = False
    no_wait: bool = False
    drop_cache: bool = False

    def output_args(self) -> dict:
        """Everything that can change the output (not where it goes, nor how it is computed)."""
        d = asdict(self)
        for k in ("out", "num_proc", "overwrite", "no_wait", "drop_cache"):
            d.pop(k)
        return json.loads(json.dumps(d))


def load_prep_config(paths: list, overrides: list[str] = (), given: dict | None = None) -> PrepConfig:
    """A PrepConfig from YAML files of its fields (later wins, `include:` composes), `key=value` overrides and
    `given` (command-line flags, winning over both), checked by tpds_common.config: unknown keys and wrong
    types are refused naming the file (or override) and the key."""
    sources: dict = {}
    data = load_files(paths, sources, ConfigError)
    apply_overrides(data, overrides, sources, ConfigError)
    data.update({k: v for k, v in (given or {}).items()})
    sources.update({k: "command line" for k in given or {}})
    where = str(paths[-1]) if paths else "command line"
    kwargs = check_fields(PrepConfig, data, where, ConfigError, sources=sources)
    missing = [f"--{k.replace('_', '-')}" for k in ("mixture", "source", "tokenizer", "out") if k not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (a flag or a key of the config file)")
    kwargs["out"] = kwargs["out"].expanduser().resolve()
    return PrepConfig(**kwargs)


@dataclass
class Result:
    status: str  # "built" | "unchanged"
    out: Path
    manifest: Manifest
    parts_reused: int = 0
    parts_built: int = 0


@dataclass
class _Plan:
    mixture: Mixture
    train: list[TrainTemplate]
    held: list[HeldOutTask]
    excluded: dict
    cap: CapRule
    source: object
    splits: dict = field(default_factory=dict)  # (config, split) -> SplitFiles


def work_dir(out: Path) -> Path:
    """Lock, part cache and staging live next to DIR (same filesystem, so the final rename is atomic)."""
    return out.parent / f".{out.name}.prep"


def _check_options(cfg: PrepConfig) -> None:
    for name in ("num_shards", "num_proc", "max_input_len", "max_target_len"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.val_per_template < 0:
        raise ConfigError(f"--val-per-template must be >= 0, got {cfg.val_per_template}")
    if cfg.few_shot_k is not None and cfg.few_shot_k < 1:
        raise ConfigError(f"--few-shot-k must be >= 1, got {cfg.few_shot_k}")
    if len(set(cfg.few_shot_seeds)) != len(cfg.few_shot_seeds):
        raise ConfigError(f"--few-shot-seeds has duplicates: {cfg.few_shot_seeds}")


def plan(cfg: PrepConfig) -> _Plan:
    _check_options(cfg)
    mixture = get_mixture(cfg.mixture)
    source = parse_source(cfg.source)
    cap = CapRule.parse(cfg.cap_per_template)
    by_name = {t.task: t for t in mixture.train}
    if cfg.train_tasks is None:
        train = list(mixture.train)
    else:
        for name in cfg.train_tasks:
            if name not in by_name:
                raise unknown_name("training task", name, by_name)
        wanted = set(cfg.train_tasks)
        train = [t for t in mixture.train if t.task in wanted]  # registry order fixes the ids
    excluded = {}
    if cfg.held_out is None:
        held = list(mixture.held_out)
        if isinstance(source, HubSource):
            excluded = {h.name: "not in bigscience/P3" for h in held if not h.on_hub}
            held = [h for h in held if h.on_hub]
    else:
        held = [mixture.held_out_task(n) for n in cfg.held_out]
        if isinstance(source, HubSource):
            off = [h.name for h in held if not h.on_hub]
            if off:
                raise ConfigError(f"held-out tasks {off} are not in bigscience/P3; use --source local:PATH")
    return _Plan(mixture, train, held, excluded, cap, source)


def _resolve(p: _Plan) -> None:
    """Every needed (config, split) mapped to its files; all missing ones listed in one error."""
    wanted = [(t.task, "train") for t in p.train]
    for h in p.held:
        wanted += [(c, s) for _, c in h.templates for s in (h.eval_split, h.few_shot_split)]
    missing = []
    for key in dict.fromkeys(wanted):
        sf = p.source.resolve(*key)
        if sf is None:
            missing.append(key)
        p.splits[key] = sf
    if missing:
        raise ConfigError(p.source.missing_message(missing))


def _recorded_sources(work: Path) -> list[dict]:
    try:
        body = json.loads((work / SOURCES_RECORD).read_text("utf-8"))
        return [fp for fps in body.values() for fp in fps]
    except (OSError, ValueError):
        return []


def _current_sources(p: _Plan, work: Path) -> dict[str, list[dict]]:
    previous = _recorded_sources(work)
    return {f"{c}/{s}": p.source.fingerprints(sf, previous) for (c, s), sf in p.splits.items()}


def _content_only(sources: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """What the manifest records: no mtimes, so equal inputs give equal manifests."""
    return {k: [{f: v for f, v in fp.items() if f != "mtime_ns"} for fp in fps] for k, fps in sorted(sources.items())}


def _existing_state(cfg: PrepConfig, p: _Plan, work: Path) -> Result | None:
    out = cfg.out
    if not out.exists():
        return None
    if (out / MANIFEST).is_file():
        try:
            m = read_manifest(out)
        except ManifestError:
            m = None
        if m is not None and m.args == cfg.output_args():
            recorded = m.sources if m.format_version == FORMAT_VERSION else None
            if recorded is None:
                log.info(f"{out} was prepared by an older format ({m.format_version}); rebuilding it")
                return None
            current = _content_only(_current_sources(p, work))
            if current == recorded:
                log.info(
                    f"{out} is already prepared with these arguments and sources (content hash "
                    f"{m.content_hash[:12]}); nothing to do"
                )
                return Result("unchanged", out, m)
            changed = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
            log.info(
                f"source data changed since {out} was prepared ({', '.join(changed[:10])}"
                f"{', ...' if len(changed) > 10 else ''}); rebuilding (unchanged configs come from the cache)"
            )
            return None
        if not cfg.overwrite:
            diff = sorted(
                k
                for k in set(cfg.output_args()) | set(m.args if m else {})
                if (m.args if m else {}).get(k) != cfg.output_args().get(k)
            )
            raise ConfigError(
                f"{out} already holds prepared data made with different arguments "
                f"(differs in: {', '.join(diff)}); pass --overwrite to replace it"
            )
        return None
    if any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} exists, is not empty and has no {MANIFEST}; pass --overwrite to replace it")
    return None


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _embedded_texts(cfg: PrepConfig, p: _Plan):
    """Every text the embedded vocabulary is counted over: training and validation rows, eval
    rows and the full-size few-shot pools (inputs, targets, answer choices)."""
    src = p.source
    for t in p.train:
        sf = p.splits[(t.task, "train")]
        reader = src.open(sf)
        for rows in split_rows(reader.num_rows(), p.cap, t.n_templates, cfg.val_per_template):
            for r in validate_chunks(reader.chunks(rows), t.task, "train", Counter(), skip_invalid=cfg.skip_invalid):
                yield from r.inputs
                yield from r.targets
    for h in p.held:
        pools = []
        for _, config in h.templates:
            reader = src.open(p.splits[(config, h.eval_split)])
            for r in validate_chunks(
                reader.chunks(range(reader.num_rows())),
                config,
                h.eval_split,
                Counter(),
                require_choices=True,
                skip_invalid=cfg.skip_invalid,
            ):
                yield from r.inputs
                for cs in r.choices:
                    yield from cs
            reader = src.open(p.splits[(config, h.few_shot_split)])
            pools.append((config, reader, reader.num_rows()))
        full = max(n for _, _, n in pools) if pools else 0
        for config, reader, n in pools:
            if n != full:
                continue
            for r in validate_chunks(
                reader.chunks(range(n)),
                config,
                h.few_shot_split,
                Counter(),
                require_choices=True,
                skip_invalid=cfg.skip_invalid,
            ):
                yield from r.inputs
                for cs in r.choices:
                    yield from cs


def _tokenizer(cfg: PrepConfig, p: _Plan):
    if cfg.tokenizer == toklib.EMBEDDED:
        counts = Counter()
        toklib.count_pieces(_embedded_texts(cfg, p), counts)
        tok = toklib.build_embedded_tokenizer(counts)
        return tok, toklib.info(tok, "tokenizer", toklib.EMBEDDED)
    tok = toklib.load_hf_tokenizer(cfg.tokenizer)
    return tok, toklib.info(tok, cfg.tokenizer, "hf")


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def _jobs(cfg: PrepConfig, p: _Plan) -> list:
    jobs: list = [
        TrainPart(t.task, p.splits[(t.task, "train")], t.n_templates, p.cap, cfg.val_per_template) for t in p.train
    ]
    for h in p.held:
        jobs.append(
            HeldOutPart(
                h.name,
                tuple((t, p.splits[(c, h.eval_split)]) for t, c in h.templates),
                tuple((t, p.splits[(c, h.few_shot_split)]) for t, c in h.templates),
                cfg.few_shot_k or h.few_shot_k,
                tuple(cfg.few_shot_seeds),
            )
        )
    return jobs


def _run_parts(cfg: PrepConfig, p: _Plan, jobs: list, tok, tinfo, cache: PartCache) -> dict:
    common = hashlib.sha256(
        json.dumps([tinfo.sha256, cfg.max_input_len, cfg.max_target_len, cfg.skip_invalid]).encode()
    ).hexdigest()
    results: dict[str, dict] = {}
    bar = progress(total=len(jobs), desc="Preparing configs", unit="config")

    def done(name: str, res: dict) -> None:
        results[name] = res
        bar.update(1)
        bar.set_postfix(reused=sum(r["reused"] for r in results.values()), refresh=False)

    try:
        if cfg.num_proc == 1 or len(jobs) <= 1:
            worker = Worker(
                p.source,
                toklib.Encoder.for_tokenizer(tok, cfg.max_input_len, cfg.max_target_len),
                cache,
                common,
                cfg.skip_invalid,
            )
            for job in jobs:
                done(job.name, worker.run(job))
        else:
            from .parts import init_worker, run_in_worker

            backend = cache.root.parent / f"tokenizer-{tinfo.sha256[:16]}.json"
            toklib.save_backend(tok, backend)
            ctx = mp.get_context("spawn")  # no fork with tokenizer/arrow threads alive
            ex = ProcessPoolExecutor(
                min(cfg.num_proc, len(jobs)),
                mp_context=ctx,
                initializer=init_worker,
                initargs=(
                    p.source,
                    str(backend),
                    tok.eos_token_id,
                    cfg.max_input_len,
                    cfg.max_target_len,
                    str(cache.root),
                    common,
                    cfg.skip_invalid,
                ),
            )
            try:
                # Largest first would balance better, but sizes are unknown until read; registry
                # order keeps the cache filling from the front, which is what a resume sees.
                pending = {ex.submit(run_in_worker, job) for job in jobs}
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in finished:
                        done(*f.result())
            except BaseException:
                # An error or Ctrl-C: stop the other workers now rather than after their current
                # part (their unfinished parts are only temporary folders, pruned by the next build).
                for proc in list((getattr(ex, "_processes", None) or {}).values()):
                    proc.terminate()
                ex.shutdown(wait=False, cancel_futures=True)
                raise
            ex.shutdown(wait=True)
    finally:
        bar.close()
    reused = sum(r["reused"] for r in results.values())
    if reused:
        log.info(f"reused {reused} of {len(jobs)} parts from the cache ({cache.root})")
    return results


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def _features(kind: str):
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    if kind == "train":
        return Features({"task_id": Value("int32"), "task_name": Value("string"), "input_ids": ids, "target_ids": ids})
    cols = {
        "task_name": Value("string"),
        "template": Value("string"),
        "example_id": Value("int64"),
        "input_ids": ids,
        "choice_ids": List(ids),
        "label": Value("int32"),
    }
    if kind == "few_shot":
        cols["target_ids"] = ids
    return Features(cols)


def _fp(base: str, part: str) -> str:
    return hashlib.sha256(f"{base}|{part}".encode()).hexdigest()[:32]


def _const(value, n: int, typ) -> pa.Array:
    return pa.array(np.full(n, value, dtype=np.int32)) if typ == pa.int32() else pa.array([value] * n, typ)


def _train_tables(cache: PartCache, jobs: list[TrainPart], split: str):
    for task_id, job in enumerate(jobs):
        for b in read_part(cache.entry(job.name) / f"{split}.arrow"):
            yield pa.table(
                {
                    "task_id": _const(task_id, b.num_rows, pa.int32()),
                    "task_name": _const(job.task, b.num_rows, pa.string()),
                    "input_ids": b.column("input_ids"),
                    "target_ids": b.column("target_ids"),
                }
            )


def _with_task(table: pa.Table, task: str) -> pa.Table:
    return table.add_column(0, "task_name", _const(task, table.num_rows, pa.string()))


@dataclass
class _Assembly:
    """The splits written into the staging folder so far and what the manifest says about them."""

    stage: Path
    base: str  # what every split's fingerprint starts from (the output arguments and the tokenizer)
    cache: PartCache
    shards: dict = field(default_factory=dict)
    counts: dict = field(default_factory=lambda: {"train": {}, "val": {}, "eval": {}, "few_shot": {}})
    truncated: dict = field(default_factory=lambda: {"train": {}, "val": {}, "eval": {}, "few_shot": {}})
    skipped_by: dict = field(default_factory=dict)
    empty: list = field(default_factory=list)
    eval_info: dict = field(default_factory=dict)
    few_info: dict = field(default_factory=dict)

    def write(self, rel: str, kind: str, tables, rows: int, num_shards: int = 1) -> None:
        self.shards[rel] = write_split(self.stage, rel, _features(kind), tables, rows, num_shards, _fp(self.base, rel))

    def add_train(self, train_jobs: list[TrainPart], results: dict, num_shards: int) -> None:
        """train and val: every training part's rows, in task order."""
        for j in train_jobs:
            r = results[j.name]
            for split in ("train", "val"):
                self.counts[split][j.task] = r["rows"][split]
                self.truncated[split][j.task] = r["truncated"][split]
            self.skipped_by.update(r["skipped"])
            self.empty += r["empty"]
        for split in ("train", "val"):
            tables = _train_tables(self.cache, train_jobs, split)
            self.write(split, "train", tables, sum(self.counts[split].values()), num_shards)

    def add_held_out(self, j: HeldOutPart, r: dict) -> None:
        """eval/<task> and its few_shot/<task>/<k>_shot/<seed>_seed splits."""
        self.skipped_by.update(r["skipped"])
        self.empty += r["empty"]
        rel = f"eval/{j.task}"
        tables = (
            _with_task(pa.Table.from_batches([b]), j.task) for b in read_part(self.cache.entry(j.name) / "eval.arrow")
        )
        self.write(rel, "eval", tables, r["eval"]["rows"])
        self.counts["eval"][j.task] = r["eval"]["rows"]
        self.truncated["eval"][j.task] = {
            "input": r["eval"]["truncated"].get("input", 0),
            "target": r["eval"]["truncated"].get("target", 0),
        }
        self.eval_info[j.task] = {
            "split": j.eval_sfs[0][1].split,
            "templates": [t for t, _ in j.eval_sfs],
            "examples": r["eval"]["examples"],
        }
        self._add_few_shot(j, r)

    def _add_few_shot(self, j: HeldOutPart, r: dict) -> None:
        """One split per few-shot seed: its sampled examples, each in every pool template, in sample order."""
        few = pa.Table.from_batches(list(read_part(self.cache.entry(j.name) / "few.arrow")), schema=FEW_SCHEMA)
        info = r["few_shot"]
        where = {
            (e, t): i
            for i, (e, t) in enumerate(zip(few.column("example_id").to_pylist(), few.column("template").to_pylist()))
        }
        self.counts["few_shot"][j.task] = {}
        for seed, ids in info["example_ids"].items():
            rel = f"few_shot/{j.task}/{info['k']}_shot/{seed}_seed"
            order = [where[(e, t)] for e in ids for t in info["templates"]]
            table = _with_task(few.take(pa.array(order, pa.int64())), j.task)
            self.write(rel, "few_shot", [table], len(order))
            self.counts["few_shot"][j.task][seed] = len(order)
        self.truncated["few_shot"][j.task] = r["few_truncated"]
        self.few_info[j.task] = info


def _assemble(
    cfg: PrepConfig, p: _Plan, jobs: list, results: dict, tok, tinfo, sources: dict, cache: PartCache, stage: Path
) -> dict:
    """Write every split from the part cache into `stage`; returns the manifest body (content hash still empty)."""
    base = hashlib.sha256(json.dumps([cfg.output_args(), tinfo.sha256]).encode()).hexdigest()
    if cfg.tokenizer == toklib.EMBEDDED:
        tok.save_pretrained(str(stage / "tokenizer"))
    done = _Assembly(stage, base, cache)
    done.add_train([j for j in jobs if isinstance(j, TrainPart)], results, cfg.num_shards)
    for j in (j for j in jobs if isinstance(j, HeldOutPart)):
        done.add_held_out(j, results[j.name])
    return _manifest_body(cfg, p, tinfo, sources, done)


def _manifest_body(cfg: PrepConfig, p: _Plan, tinfo, sources: dict, done: _Assembly) -> dict:
    counts = done.counts
    totals = {s: sum(counts[s].values()) for s in ("train", "val", "eval")}
    return {
        "format_version": FORMAT_VERSION,
        "tasks": [t.task for t in p.train],
        "held_out": [h.name for h in p.held],
        "tokenizer": tinfo.to_json(),
        "max_input_len": cfg.max_input_len,
        "max_target_len": cfg.max_target_len,
        "mixture": cfg.mixture,
        "source": p.source.describe(),
        "rule": {
            "tasks": "every template of every training dataset is a task (task id = index in tasks)",
            "mixing": "examples-proportional with a per-template cap",
            "cap": p.cap.describe(),
            "cap_per_template": cfg.cap_per_template,
            "val_per_template": cfg.val_per_template,
            "val_rows": "last min(val_per_template, size // 2) rows of each template's train split; "
            "training rows are train[0:min(cap, size - v)]",
            "held_out_excluded": p.excluded,
        },
        "counts": {**counts, "totals": totals},
        "truncated": done.truncated,
        "skipped": {
            "total": {r: sum(c.get(r, 0) for c in done.skipped_by.values()) for r in REASONS},
            "by_config": dict(sorted(done.skipped_by.items())),
            "empty": sorted(done.empty),
        },
        "shards": done.shards,
        "content_hash": "",
        "args": cfg.output_args(),
        "few_shot": done.few_info,
        "eval": done.eval_info,
        "sources": _content_only(sources),
        **p.mixture.manifest_extra,  # e.g. the latent-skill mixtures' ground truth
    }


def _log_rate(what: str, started: float, jobs: list, results: dict) -> None:
    """Rows read and tokenised by the parts built in this run (not the reused ones), per second."""
    sec = time.perf_counter() - started
    rows = 0
    for j in jobs:
        r = results[j.name]
        if not r["reused"]:
            rows += sum(r["rows"].values()) if isinstance(j, TrainPart) else r["eval"]["rows"]
    built = sum(not r["reused"] for r in results.values())
    log.info(
        f"{what}: {built} built, {len(jobs) - built} reused, {rows} rows in {sec:.1f} s "
        f"({rows / max(sec, 1e-9):.1f} rows/s)"
    )


def _clean_stale(work: Path) -> None:
    """Staging folders of runs that were killed (we hold the lock, so none is live)."""
    for p in work.glob("stage-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in work.glob("old-*"):
        shutil.rmtree(p, ignore_errors=True)


def build(cfg: PrepConfig) -> Result:
    p = plan(cfg)
    work = work_dir(cfg.out)
    lock = FolderLock(work, what=f"the prep of {cfg.out}")
    try:
        lock.acquire(
            wait_s=0.5 if cfg.no_wait else None,
            on_wait=lambda who: log.warning(f"{who}; waiting for it to finish (--no-wait refuses instead)"),
        )
    except LockHeld as held:
        raise OutputBusy(f"{held} (not waiting: --no-wait)") from None
    try:
        _clean_stale(work)
        _resolve(p)
        done = _existing_state(cfg, p, work)
        if done is not None:
            return done
        tok, tinfo = _tokenizer(cfg, p)
        jobs = _jobs(cfg, p)
        cache = PartCache(work / "parts")
        started = time.perf_counter()
        results = _run_parts(cfg, p, jobs, tok, tinfo, cache)
        _log_rate("parts", started, jobs, results)
        started = time.perf_counter()
        sources = {}
        for job in jobs:
            sfs = [job.sf] if isinstance(job, TrainPart) else [sf for _, sf in job.eval_sfs + job.pool_sfs]
            for sf, fps in zip(sfs, results[job.name]["sources"]):
                sources[f"{sf.config}/{sf.split}"] = fps
        with Staging(cfg.out, work) as stage:
            body = _assemble(cfg, p, jobs, results, tok, tinfo, sources, cache, stage.path)
            body["content_hash"] = content_hash(stage.path, body)
            write_json_atomic(stage.path / MANIFEST, body)
            stage.commit()
        log.info(f"assembled {cfg.out} in {time.perf_counter() - started:.1f} s")
        write_json_atomic(work / SOURCES_RECORD, sources)
        keep = {j.name for j in jobs} if not cfg.drop_cache else set()
        cache.prune(keep)
        for saved in work.glob("tokenizer-*.json"):  # the workers' copy; rewritten when needed
            saved.unlink()
    finally:
        lock.release()
    m = read_manifest(cfg.out)
    reused = sum(r["reused"] for r in results.values())
    log.info(f"wrote {cfg.out}: {len(m.tasks)} training tasks, {counts_line(m)}, content hash {m.content_hash[:12]}")
    return Result("built", cfg.out, m, parts_reused=reused, parts_built=len(jobs) - reused)


def counts_line(m: Manifest) -> str:
    t = m.counts.get("totals", {})
    return f"{t.get('train', 0)} train / {t.get('val', 0)} val rows, {len(m.held_out)} held-out tasks"
