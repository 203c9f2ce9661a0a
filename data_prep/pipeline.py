"""Orchestration: resolve the request, load and validate, tokenise, write atomically.

Order matters for the user: every cheap check (names, options, output directory state,
presence of configs) runs before loading, and every record is validated before tokenising.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import fewshot, tokenizer as toklib
from .errors import ConfigError, unknown_name
from .manifest import FORMAT_VERSION, Manifest, ManifestError, read_manifest
from .mixture import CapRule, HeldOutTask, Mixture, TrainTemplate, get_mixture
from .records import REASONS, Records, split_size, validate
from .sources import HubSource, parse_source
from .writer import MANIFEST, Staging, content_hash, save_split, write_json_atomic

DEFAULT_SEEDS = (0, 1024, 42)


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

    def output_args(self) -> dict:
        """Everything that can change the output (not out, num_proc or overwrite)."""
        d = asdict(self)
        for k in ("out", "num_proc", "overwrite"):
            d.pop(k)
        return json.loads(json.dumps(d))


@dataclass
class Result:
    status: str          # "built" | "unchanged"
    out: Path
    manifest: Manifest


@dataclass
class _Plan:
    mixture: Mixture
    train: list[TrainTemplate]
    held: list[HeldOutTask]
    excluded: dict
    cap: CapRule
    source: object


@dataclass
class _Loaded:
    train: dict = field(default_factory=dict)      # task -> Records
    val: dict = field(default_factory=dict)        # task -> Records
    eval: dict = field(default_factory=dict)       # task -> [(template, Records)]
    pool: dict = field(default_factory=dict)       # task -> [(template, Records)] (aligned templates)
    pool_excluded: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)    # "config/split" -> Counter


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
        train = [t for t in mixture.train if t.task in wanted]   # registry order fixes the ids
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


def _existing_state(cfg: PrepConfig, log) -> Result | None:
    out = cfg.out
    if not out.exists():
        return None
    if (out / MANIFEST).is_file():
        try:
            m = read_manifest(out)
        except ManifestError:
            m = None
        if m is not None and m.args == cfg.output_args():
            log(f"{out} is already prepared with these arguments (content hash {m.content_hash[:12]}); nothing to do")
            return Result("unchanged", out, m)
        if not cfg.overwrite:
            diff = sorted(k for k in set(cfg.output_args()) | set(m.args if m else {})
                          if (m.args if m else {}).get(k) != cfg.output_args().get(k))
            raise ConfigError(f"{out} already holds prepared data made with different arguments "
                              f"(differs in: {', '.join(diff)}); pass --overwrite to replace it")
        return None
    if any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} exists, is not empty and has no {MANIFEST}; pass --overwrite to replace it")
    return None


def _load(cfg: PrepConfig, p: _Plan, log) -> _Loaded:
    from tqdm.auto import tqdm

    src, ld = p.source, _Loaded()
    configs = [t.task for t in p.train] + [c for h in p.held for _, c in h.templates]
    src.check_configs(configs)

    def note(recs: Records) -> None:
        if recs.skipped:
            ld.skipped[f"{recs.config}/{recs.split}"] = recs.skipped

    for t in tqdm(p.train, desc="Loading training configs", unit="config"):
        chunks = src.load(t.task, "train")
        n = split_size(chunks)
        # Validation rows are the last v rows of the split, so they never overlap train[0:cap].
        v = min(cfg.val_per_template, n // 2)
        n_train = min(p.cap.cap(n, t.n_templates), n - v)
        ld.train[t.task] = validate(chunks, t.task, "train", range(0, n_train), skip_invalid=cfg.skip_invalid)
        ld.val[t.task] = validate(chunks, t.task, "val", range(n - v, n), skip_invalid=cfg.skip_invalid)
        note(ld.train[t.task]), note(ld.val[t.task])

    for h in tqdm(p.held, desc="Loading held-out configs", unit="task"):
        ld.eval[h.name] = []
        pools = []
        for template, config in h.templates:
            recs = validate(src.load(config, h.eval_split), config, h.eval_split,
                            require_choices=True, skip_invalid=cfg.skip_invalid)
            note(recs)
            ld.eval[h.name].append((template, recs))
            chunks = src.load(config, h.few_shot_split)
            recs = validate(chunks, config, h.few_shot_split, require_choices=True, skip_invalid=cfg.skip_invalid)
            note(recs)
            pools.append((template, recs, split_size(chunks)))
        # example_id is the row index inside a config; only templates rendering the full split
        # (same row count) index the same examples, so only those are used for few-shot rows.
        full = max(n for _, _, n in pools) if pools else 0
        ld.pool[h.name] = [(t, r) for t, r, n in pools if n == full]
        ld.pool_excluded[h.name] = [t for t, _, n in pools if n != full]
    return ld


def _texts(ld: _Loaded):
    for group in (ld.train, ld.val):
        for r in group.values():
            yield from r.inputs
            yield from r.targets
    for group in (ld.eval, ld.pool):
        for pairs in group.values():
            for _, r in pairs:
                yield from r.inputs
                for cs in r.choices:
                    yield from cs


def _tokenizer(cfg: PrepConfig, ld: _Loaded, staging: Path):
    if cfg.tokenizer == toklib.EMBEDDED:
        tok = toklib.build_embedded_tokenizer(_texts(ld))
        tok.save_pretrained(str(staging / "tokenizer"))
        return tok, toklib.info(tok, "tokenizer", toklib.EMBEDDED)
    tok = toklib.load_hf_tokenizer(cfg.tokenizer)
    return tok, toklib.info(tok, cfg.tokenizer, "hf")


def _features(kind: str):
    from datasets import Features, List, Value
    ids = List(Value("int32"))
    if kind == "train":
        return Features({"task_id": Value("int32"), "task_name": Value("string"), "input_ids": ids,
                         "target_ids": ids, "input_truncated": Value("bool"), "target_truncated": Value("bool")})
    return Features({"task_name": Value("string"), "template": Value("string"), "example_id": Value("int64"),
                     "label": Value("int32"), "input_ids": ids, "choice_ids": List(ids), "target_ids": ids,
                     "input_truncated": Value("bool"), "target_truncated": Value("bool")})


def _tokenise(rows: dict, kind: str, fn: Callable, key: str, num_proc: int, desc: str):
    """One datasets.map over all rows of a split. The cache is bypassed and the fingerprint set
    from our own key: datasets cannot hash fast tokenizers stably (REFERENCE pitfall 10)."""
    from datasets import Dataset, Features, List, Value

    text_cols = ["input_text", "target_text"] if kind == "train" else ["input_text", "choices"]
    in_feats = {k: v for k, v in _features(kind).items()
                if k in rows and k not in ("input_ids", "target_ids", "choice_ids")}
    in_feats.update({"input_text": Value("string")})
    in_feats.update({"target_text": Value("string")} if kind == "train" else {"choices": List(Value("string"))})
    ds = Dataset.from_dict(rows, features=Features(in_feats))
    n_proc = max(1, min(num_proc, len(ds)))
    return ds.map(fn, batched=True, batch_size=1000, num_proc=n_proc if n_proc > 1 else None,
                  keep_in_memory=True, load_from_cache_file=False, new_fingerprint=key,
                  remove_columns=text_cols, features=_features(kind), desc=desc)


def _trunc_counts(ds, key_col: str, names: list) -> dict:
    keys = ds.data.column(key_col).to_pylist()
    inp = ds.data.column("input_truncated").to_numpy(zero_copy_only=False)
    tgt = ds.data.column("target_truncated").to_numpy(zero_copy_only=False)
    out = {n: {"input": 0, "target": 0} for n in names}
    for k, a, b in zip(keys, inp, tgt):
        name = names[k] if isinstance(k, (int, np.integer)) else k
        out[name]["input"] += int(a)
        out[name]["target"] += int(b)
    return out


def _fp(base: str, part: str) -> str:
    return hashlib.sha256(f"{base}|{part}".encode()).hexdigest()[:32]


def build(cfg: PrepConfig, log: Callable[[str], None] = print) -> Result:
    p = plan(cfg)
    done = _existing_state(cfg, log)
    if done is not None:
        return done
    ld = _load(cfg, p, log)
    if cfg.num_proc > 1:
        # Rust-side threads plus forked map workers can deadlock; the workers give parallelism.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tasks = [t.task for t in p.train]
    with Staging(cfg.out) as stage:
        tok, tinfo = _tokenizer(cfg, ld, stage.path)
        enc = toklib.Encoder(tok, cfg.max_input_len, cfg.max_target_len)
        base = hashlib.sha256(json.dumps([cfg.output_args(), tinfo.sha256]).encode()).hexdigest()
        shards, counts, truncated = {}, {"train": {}, "val": {}, "eval": {}, "few_shot": {}}, {}

        for split, group in (("train", ld.train), ("val", ld.val)):
            rows = {"task_id": [], "task_name": [], "input_text": [], "target_text": []}
            for i, name in enumerate(tasks):
                r = group[name]
                rows["task_id"] += [i] * len(r)
                rows["task_name"] += [name] * len(r)
                rows["input_text"] += r.inputs
                rows["target_text"] += r.targets
                counts[split][name] = len(r)
            ds = _tokenise(rows, "train", enc.train_batch, _fp(base, split), cfg.num_proc, f"Tokenising {split}")
            truncated[split] = _trunc_counts(ds, "task_id", tasks)
            ds = ds.remove_columns(["input_truncated", "target_truncated"])
            shards[split] = save_split(ds, stage.path, split, cfg.num_shards)

        eval_cols = ["task_name", "template", "example_id", "input_ids", "choice_ids", "label"]
        eval_info, few_info = {}, {}
        truncated["eval"], truncated["few_shot"] = {}, {}
        for h in p.held:
            rows = {"task_name": [], "template": [], "example_id": [], "label": [], "input_text": [], "choices": []}
            for template, r in ld.eval[h.name]:
                rows["task_name"] += [h.name] * len(r)
                rows["template"] += [template] * len(r)
                rows["example_id"] += r.example_ids
                rows["label"] += r.labels
                rows["input_text"] += r.inputs
                rows["choices"] += r.choices
            ds = _tokenise(rows, "choice", enc.choice_batch, _fp(base, f"eval/{h.name}"), cfg.num_proc,
                           f"Tokenising eval {h.name}")
            truncated["eval"].update(_trunc_counts(ds, "task_name", [h.name]))
            ds = ds.select_columns(eval_cols)
            shards[f"eval/{h.name}"] = save_split(ds, stage.path, f"eval/{h.name}", 1)
            counts["eval"][h.name] = len(ds)
            eval_info[h.name] = {"split": h.eval_split, "templates": [t for t, _ in h.templates],
                                 "examples": len({e for _, r in ld.eval[h.name] for e in r.example_ids})}
            few_info[h.name] = _few_shot(cfg, h, ld, enc, base, stage.path, shards, counts, truncated)

        body = Manifest(
            format_version=FORMAT_VERSION, tasks=tasks, held_out=[h.name for h in p.held],
            tokenizer=tinfo.to_json(), max_input_len=cfg.max_input_len, max_target_len=cfg.max_target_len,
            mixture=cfg.mixture, source=p.source.describe(),
            rule={"tasks": "every template of every training dataset is a task (task id = index in tasks)",
                  "mixing": "examples-proportional with a per-template cap",
                  "cap": p.cap.describe(), "cap_per_template": cfg.cap_per_template,
                  "val_per_template": cfg.val_per_template,
                  "val_rows": "last min(val_per_template, size // 2) rows of each template's train split; "
                              "training rows are train[0:min(cap, size - v)]",
                  "held_out_excluded": p.excluded},
            counts={**counts, "totals": {s: sum(counts[s].values()) for s in ("train", "val", "eval")}},
            truncated=truncated,
            skipped={"total": {r: sum(c.get(r, 0) for c in ld.skipped.values()) for r in REASONS},
                     "by_config": {k: dict(sorted(v.items())) for k, v in ld.skipped.items()}},
            shards=shards, content_hash="", args=cfg.output_args(), few_shot=few_info, eval=eval_info,
            extra=dict(p.mixture.manifest_extra),
        ).to_json()
        body["content_hash"] = content_hash(stage.path, body)
        write_json_atomic(stage.path / MANIFEST, body)
        stage.commit()
    m = read_manifest(cfg.out)
    log(f"wrote {cfg.out}: {len(tasks)} training tasks, {counts_line(m)}, content hash {m.content_hash[:12]}")
    return Result("built", cfg.out, m)


def _few_shot(cfg, h: HeldOutTask, ld: _Loaded, enc, base: str, root: Path, shards, counts, truncated) -> dict:
    k = cfg.few_shot_k or h.few_shot_k
    pools = ld.pool[h.name]
    cands = set.intersection(*(set(r.example_ids) for _, r in pools)) if pools else set()
    if h.few_shot_split == h.eval_split:   # same split: keep eval rows out of the shots
        cands -= {e for _, r in ld.eval[h.name] for e in r.example_ids}
    picks = {s: fewshot.sample(h.name, s, sorted(cands), k) for s in cfg.few_shot_seeds}
    needed = sorted({e for ids in picks.values() for e in ids})
    rows = {"task_name": [], "template": [], "example_id": [], "label": [], "input_text": [], "choices": []}
    where = {}
    for template, r in pools:
        pos = {e: i for i, e in enumerate(r.example_ids)}
        for e in needed:
            i = pos[e]
            where[(e, template)] = len(rows["task_name"])
            rows["task_name"].append(h.name)
            rows["template"].append(template)
            rows["example_id"].append(e)
            rows["label"].append(r.labels[i])
            rows["input_text"].append(r.inputs[i])
            rows["choices"].append(r.choices[i])
    ds = _tokenise(rows, "choice", enc.choice_batch, _fp(base, f"few_shot/{h.name}"), cfg.num_proc,
                   f"Tokenising few-shot {h.name}")
    truncated["few_shot"].update(_trunc_counts(ds, "task_name", [h.name]))
    ds = ds.select_columns(["task_name", "template", "example_id", "input_ids", "choice_ids", "label", "target_ids"])
    counts["few_shot"][h.name] = {}
    for seed, ids in picks.items():
        rel = f"few_shot/{h.name}/{k}_shot/{seed}_seed"
        order = [where[(e, t)] for e in ids for t, _ in pools]
        shards[rel] = save_split(ds.select(order), root, rel, 1)
        counts["few_shot"][h.name][str(seed)] = len(order)
    return {"k": k, "seeds": list(cfg.few_shot_seeds), "source_split": h.few_shot_split,
            "templates": [t for t, _ in pools], "templates_excluded": ld.pool_excluded[h.name],
            "candidates": len(cands), "example_ids": {str(s): ids for s, ids in picks.items()}}


def counts_line(m: Manifest) -> str:
    t = m.counts.get("totals", {})
    return f"{t.get('train', 0)} train / {t.get('val', 0)} val rows, {len(m.held_out)} held-out tasks"
