"""The replication protocol as one YAML file, validated into dataclasses before anything runs.

Everything that decides a number in the results is here (and so in the committed config): the data
variants, the backbone recipe, the multi-task pretraining budget shared by every method, the methods and
their adaptation modes, the few-shot budget and the learning-rate grid shared by every method, the seeds,
the zero-shot rows and the claims file. Unknown keys are rejected naming the key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpds_common.config import (
    ADDED_LATER,
    apply_override,
    apply_overrides,
    build,
    read_yaml,
    reject_unknown,
    stable_asdict,
)

from ..adapters import AdapterConfig, ConfigError
from ..adapters.modes import MODES

FULLFT = "fullft"


class ReplicateConfigError(ConfigError):
    """The replicate config is invalid; the message names the file and the key."""


@dataclass
class Variant:
    name: str  # directory name and the prefix of every row in the results
    mixture: str  # a data_prep mixture (latent_skills, latent_skills_noprompt)
    modes: list | None = None  # adaptation modes run on this variant (default: each method's)


@dataclass
class PrepSection:
    ks: list = field(default_factory=lambda: [4, 16])  # few-shot sizes, one prepared directory each
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    val_per_template: int = 50
    cap_per_template: str | None = None  # prep --cap-per-template (None: every generated example)


@dataclass
class BackboneSection:
    """The T5-LM analogue: a tiny T5 trained with the pretrain engine (full fine-tune) to reconstruct
    corrupted generic word sequences of the benchmark's vocabulary (never the tasks)."""

    arch: str = "tiny"  # tensorpoly_ds.models architecture
    arch_overrides: dict = field(default_factory=dict)
    corpus_size: int = 20000  # training sequences (each corrupted once, statically)
    val_size: int = 500
    mask_ratio: float = 0.25  # share of words replaced by the mask token (<unk>)
    steps: int = 1500
    micro_batch: int = 64
    lr: float = 1e-2
    warmup_ratio: float = 0.06
    eval_every: int = 250
    seed: int = 0


@dataclass
class PretrainSection:
    """Multi-task pretraining: the same budget and recipe for every method (tensorpoly-ds pretrain)."""

    steps: int = 600
    micro_batch: int = 32
    optimizer: str = "adamw"
    module_lr: float = 1e-2
    routing_lr: float = 1e-1
    warmup_ratio: float = 0.06
    eval_every: int = 200
    val_max_samples: int = 200
    seed: int = 42
    # Per-method learning rates chosen on multi-task validation loss (tensorpoly_ds.engine.lr_search fields:
    # module_lrs, routing_lrs, steps, max_extensions), in the first world; the other worlds reuse the choice.
    # None: every method trains at module_lr / routing_lr.
    lr_search: dict | None = None
    # "Did not train": a method whose final multi-task val loss (mean over worlds) exceeds `untrained_factor`
    # times that of `untrained_reference` (a method label); claim comparisons involving it are untestable.
    untrained_reference: str | None = None
    untrained_factor: float = 2.0
    # The reference of task-blind rows (no learned routing: LoRA, TLoRA, Random-mu), when set. In a variant whose
    # input does not name the task such a row cannot reach a routed method's val loss however well it trains, so
    # judging it against `untrained_reference` (a routed method) marks it whatever happened (protocol v2.1).
    untrained_task_blind_reference: str | None = None
    # Sensitivity check of the selection rule: adapt every module-lr candidate of each search (the first mode
    # of the method, the first world's search seeds, every task, at the row's chosen adaptation lr) and report
    # which candidate the dev-accuracy rule would have chosen. Reported only: it never changes a choice.
    sensitivity: bool = False
    # Run-config keys (dotted, e.g. {train.log_every: 10, optim.weight_decay: 0.01}) every pretraining run sets
    # on top of what PRETRAIN_RUN_CONFIG derives: the run config embedded, not re-declared here.
    run_config: dict = field(default_factory=dict, metadata={ADDED_LATER: True})


@dataclass
class World:
    """One independent replicate of everything random: the backbone's seed, the pretraining seed and the
    few-shot seeds (distinct across worlds, so (task, seed) pairs never collide when worlds are pooled)."""

    name: str
    backbone_seed: int
    pretrain_seed: int
    seeds: list


# the fields of MethodSpec.pretrain: a method's own recipe, outside the shared one (run_config: run-config keys
# this method's runs set on top of the shared pretrain.run_config)
METHOD_PRETRAIN_KEYS = ("optimizer", "module_lr", "routing_lr", "search", "run_config")


@dataclass(frozen=True)
class Fixed:
    """A value every replicate pretraining run uses, whatever the config says."""

    value: Any


# A pretraining run's config (replicate.stages.run_config), key by key in the order run.yaml lists them: the
# run-config key and where its value comes from: "recipe.<field>" the method's recipe (method_pretrain),
# "pretrain.<field>" the shared section, "world.<field>" the world, "run.<name>" the run's paths and adapter,
# Fixed(...) a constant. Then pretrain.run_config and the method's run_config, dotted keys, win.
PRETRAIN_RUN_CONFIG = (
    ("model.name_or_path", "run.backbone"),
    ("adapter", "run.adapter"),
    ("optim.name", "recipe.optimizer"),
    ("optim.module_lr", "recipe.module_lr"),
    ("optim.routing_lr", "recipe.routing_lr"),
    ("optim.warmup_ratio", "pretrain.warmup_ratio"),
    ("optim.schedule", Fixed("linear")),
    ("optim.clip", Fixed(1.0)),
    ("train.steps", "pretrain.steps"),
    ("train.micro_batch", "pretrain.micro_batch"),
    ("train.grad_accum", Fixed(1)),
    ("train.eval_every", "pretrain.eval_every"),
    ("train.save_every", "pretrain.eval_every"),
    ("train.seed", "world.pretrain_seed"),
    ("train.log_every", Fixed(50)),
    ("train.keep_checkpoints", Fixed(1)),
    ("train.heatmap_max_layers", Fixed(2)),
    ("train.progress_bar", Fixed(False)),
    ("data.dir", "run.data"),
    ("data.val_max_samples", "pretrain.val_max_samples"),
    ("deepspeed.zero_stage", Fixed(0)),
    ("deepspeed.precision", Fixed("fp32")),
    ("run.dir", "run.dir"),
)
# The backbone's run config (replicate.backbone.backbone_run_config), the same way: "backbone.<field>" the world's
# backbone section, "run.<name>" the tokenizer's vocabulary size and the run's folder, Fixed(...) a constant;
# every other key keeps the engine's default. A full fine-tune of a fresh tiny T5, ZeRO-0, fp32.
BACKBONE_RUN_CONFIG = (
    ("model.name_or_path", "backbone.arch"),
    ("model.vocab_size", "run.vocab_size"),
    ("model.arch_overrides", "backbone.arch_overrides"),
    ("adapter", Fixed(None)),
    ("optim.name", Fixed("adamw")),
    ("optim.lr", "backbone.lr"),
    ("optim.warmup_ratio", "backbone.warmup_ratio"),
    ("optim.schedule", Fixed("linear")),
    ("optim.clip", Fixed(1.0)),
    ("train.steps", "backbone.steps"),
    ("train.micro_batch", "backbone.micro_batch"),
    ("train.grad_accum", Fixed(1)),
    ("train.eval_every", "backbone.eval_every"),
    ("train.save_every", "backbone.eval_every"),
    ("train.log_every", Fixed(50)),
    ("train.seed", "backbone.seed"),
    ("train.full_finetune", Fixed(True)),
    ("train.keep_checkpoints", Fixed(1)),
    ("train.heatmap_max_layers", Fixed(0)),
    ("deepspeed.zero_stage", Fixed(0)),
    ("deepspeed.precision", Fixed("fp32")),
    ("run.dir", "run.dir"),
)


def resolve_run_config(
    mapping: Sequence[tuple[str, Any]], values: dict[str, dict], where: str, sources: dict | None = None
) -> dict:
    """A run config (nested mapping) from a declared mapping of (dotted run-config key, source): a source is
    Fixed(value) or "<group>.<name>", looked up in `values` ({group: {name: value}}). `sources` gets `where` as
    the origin of every key (the run-config loader's error messages name it)."""
    config: dict = {}
    sources = {} if sources is None else sources
    for key, source in mapping:
        if isinstance(source, Fixed):
            value = source.value
        else:
            group, name = source.split(".", 1)
            value = values[group][name]
        apply_override(config, key.split("."), value, sources, where)
    return config


# run-config keys that name one run's inputs and outputs: no run_config may set them
PER_RUN_KEYS = ("model.name_or_path", "adapter", "data.dir", "run.dir")

# An adaptation job's fields shared by every row (replicate.stages): job field <- adapt section field, then
# the fixed job fields.
ADAPT_JOB_FIELDS = (
    ("steps", "steps"),
    ("batch_size", "batch_size"),
    ("optimizer", "optimizer"),
    ("warmup_ratio", "warmup_ratio"),
    ("clip", "clip"),
    ("eval_batch_size", "eval_batch_size"),
    ("length_norm", "length_norm"),
)
ADAPT_JOB_FIXED = {"eval_every": 0, "trainer": "local"}


@dataclass
class MethodSpec:
    label: str
    adapter: dict | None = None  # AdapterConfig fields: pretrained multi-task, then adapted
    fresh: dict | None = None  # {"method": "fullft"} or AdapterConfig fields: no pretraining
    modes: list | None = None  # default: full, z, mu for routed methods, full otherwise
    variants: list | None = None  # default: every variant
    # its own pretraining recipe (METHOD_PRETRAIN_KEYS), e.g. the official TensorPoly recipe:
    # {optimizer: adafactor, module_lr: 3e-4, routing_lr: 0.1, search: false}; None: the shared one
    pretrain: dict | None = None

    def is_pretrained(self) -> bool:
        return self.adapter is not None


@dataclass
class AdaptSection:
    """Few-shot adaptation: the same steps, batch and learning-rate grid for every (method, mode)."""

    steps: int = 60
    batch_size: int = 8
    lrs: list = field(default_factory=lambda: [1e-3, 1e-2])
    routing_lr_scale: float = 10.0  # routing logits train with lr x this (pretraining's 0.1 / 1e-2)
    lr_search_seeds: int | None = None  # the first N seeds run every lr; the others only the lr chosen
    # on their dev accuracy (None: every seed runs every lr)
    max_extensions: int = 0  # edge rule: a row whose chosen lr is the smallest / largest it ran
    # also runs one grid step beyond, up to this many times
    optimizer: str = "adamw"
    warmup_ratio: float = 0.06
    clip: float = 1.0
    eval_batch_size: int = 64
    length_norm: float = 1.0
    tasks: list | None = None  # default: every held-out task of the variant


@dataclass
class ZeroShotSection:
    """MHR's Table 5: average the modules (mode mu), then k extra multi-task steps, no few-shot data; LoRA
    gets the same steps. Rows for every entry of multitask_steps (0 = averaging alone)."""

    variants: list = field(default_factory=list)
    methods: list = field(default_factory=list)  # labels of pretrained methods
    multitask_steps: list = field(default_factory=lambda: [0, 50])
    multitask_batch_size: int = 16
    lr: float = 1e-3


@dataclass
class ReplicateConfig:
    variants: list[Variant]
    methods: list[MethodSpec]
    prep: PrepSection = field(default_factory=PrepSection)
    backbone: BackboneSection = field(default_factory=BackboneSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    adapt: AdaptSection = field(default_factory=AdaptSection)
    zero_shot: ZeroShotSection = field(default_factory=ZeroShotSection)
    claims: str | None = None  # claims YAML (relative to this config file)
    worlds: list | None = None  # [World]; None: one world from backbone.seed, pretrain.seed, prep.seeds
    workers: int = 2  # concurrent adaptation jobs / pretraining runs
    out: str = "runs/replicate"  # default output directory (--out overrides)
    cache: str | None = None  # backbone cache (default: OUT/cache)
    source: str = ""  # the file this config was read from

    # --- derived -----------------------------------------------------------------------------------------
    def methods_for(self, variant: str) -> list[MethodSpec]:
        return [m for m in self.methods if m.variants is None or variant in m.variants]

    def modes_for(self, variant: Variant, method: MethodSpec) -> list[str]:
        return [x for x in method.modes if variant.modes is None or x in variant.modes]

    def method(self, label: str) -> MethodSpec:
        for m in self.methods:
            if m.label == label:
                return m
        raise KeyError(label)

    def world_list(self) -> list[World]:
        """The worlds; without `worlds`, one unnamed world (the single-world layout of OUT)."""
        if self.worlds:
            return list(self.worlds)
        return [World("", self.backbone.seed, self.pretrain.seed, list(self.prep.seeds))]

    def all_seeds(self) -> list[int]:
        """Every few-shot seed of every world: the few-shot samples prep draws."""
        return [s for w in self.world_list() for s in w.seeds]

    def search_seeds(self) -> list[int]:
        """The seeds that run every learning rate of the grid (the lr of a row is chosen on their dev scores):
        the first `lr_search_seeds` of the first world's seeds."""
        seeds = self.world_list()[0].seeds
        n = self.adapt.lr_search_seeds
        return list(seeds if n is None else seeds[:n])

    @staticmethod
    def task_blind(method: MethodSpec) -> bool:
        """Whether a pretrained method has no learned task routing (a shared adapter, or random routing)."""
        cfg = AdapterConfig.from_dict(method.adapter)
        return not cfg.routed or cfg.routing == "random"

    def method_pretrain(self, method: MethodSpec) -> dict:
        """A pretrained method's recipe: optimizer, module_lr, routing_lr and whether its lrs are searched (and
        its own run_config, if it has one)."""
        p = self.pretrain
        recipe = {
            "optimizer": p.optimizer,
            "module_lr": p.module_lr,
            "routing_lr": p.routing_lr,
            "search": p.lr_search is not None,
        }
        recipe.update(method.pretrain or {})
        return recipe

    def pretrain_run_config(self, method: MethodSpec, world: World, paths: dict[str, Any]) -> dict:
        """The run config of `method`'s pretraining run in `world` (PRETRAIN_RUN_CONFIG, then the embedded
        run_config keys); `paths`: backbone, data, dir (strings)."""
        values = {
            "recipe": self.method_pretrain(method),
            "pretrain": dataclasses.asdict(self.pretrain),
            "world": dataclasses.asdict(world),
            "run": {**paths, "adapter": dict(method.adapter)},
        }
        config = resolve_run_config(PRETRAIN_RUN_CONFIG, values, "PRETRAIN_RUN_CONFIG")
        embedded = {**self.pretrain.run_config, **(method.pretrain or {}).get("run_config", {})}
        for key, value in embedded.items():
            apply_override(config, key.split("."), copy.deepcopy(value), {}, "run_config")
        return config

    def adapt_job_base(self) -> dict:
        """The job fields every adaptation row shares (ADAPT_JOB_FIELDS, ADAPT_JOB_FIXED)."""
        return {**{job: getattr(self.adapt, name) for job, name in ADAPT_JOB_FIELDS}, **ADAPT_JOB_FIXED}

    def claims_path(self) -> Path | None:
        if not self.claims:
            return None
        p = Path(self.claims)
        return p if p.is_absolute() or not self.source else Path(self.source).resolve().parent / p

    def digest(self, section: Any, *extra: Any) -> str:
        """A short stable hash of a section (plus extra values): cache and run keys."""
        body = json.dumps([stable_asdict(section), *extra], sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


@dataclass
class _TopLevel:
    """The top-level scalars of ReplicateConfig, validated like a section."""

    claims: str | None = None
    workers: int = 2
    out: str = "runs/replicate"
    cache: str | None = None


_SECTIONS = {
    "prep": PrepSection,
    "backbone": BackboneSection,
    "pretrain": PretrainSection,
    "adapt": AdaptSection,
    "zero_shot": ZeroShotSection,
}
_SCALARS = {f.name for f in dataclasses.fields(_TopLevel)}


def _section(cls, data: Any, name: str, src: str):
    return build(cls, data, name, {name: src}, ReplicateConfigError)


def _check_adapter(fields: dict, where: str) -> None:
    try:
        AdapterConfig.from_dict(fields, source=where)
    except (ConfigError, TypeError) as err:
        raise ReplicateConfigError(f"{where}: {err}") from None


def _method(data: Any, i: int, src: str) -> MethodSpec:
    where = f"methods[{i}]"
    m = _section(MethodSpec, data, where, src)
    if (m.adapter is None) == (m.fresh is None):
        raise ReplicateConfigError(
            f"{src}: {where} ({m.label}): give exactly one of 'adapter' (pretrained) or "
            "'fresh' (no multi-task pretraining)"
        )
    if m.adapter is not None:
        _check_adapter(m.adapter, f"{src}: {where}.adapter")
        routed = AdapterConfig.from_dict(m.adapter).routed
    else:
        if m.fresh.get("method") != FULLFT:
            _check_adapter(m.fresh, f"{src}: {where}.fresh")
        routed = False  # a fresh adapter has no multi-task routing to adapt
    if m.modes is None:
        m.modes = list(MODES) if routed else ["full"]
    bad = [x for x in m.modes if x not in MODES or (not routed and x != "full")]
    if bad:
        raise ReplicateConfigError(
            f"{src}: {where}.modes ({m.label}): {bad} not applicable; valid: {list(MODES) if routed else ['full']}"
        )
    return m


def build_config(data: dict, src: str = "<dict>") -> ReplicateConfig:
    if not isinstance(data, dict):
        raise ReplicateConfigError(f"{src}: the top level must be a mapping")
    valid = {"variants", "methods", "worlds", *_SECTIONS, *_SCALARS}
    reject_unknown(data, valid, src, ReplicateConfigError)
    for key in ("variants", "methods"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise ReplicateConfigError(f"{src}: '{key}' must be a non-empty list")
    variants = [_section(Variant, v, f"variants[{i}]", src) for i, v in enumerate(data["variants"])]
    worlds = None
    if data.get("worlds") is not None:
        if not isinstance(data["worlds"], list) or not data["worlds"]:
            raise ReplicateConfigError(f"{src}: 'worlds' must be a non-empty list")
        worlds = [_section(World, w, f"worlds[{i}]", src) for i, w in enumerate(data["worlds"])]
        for section, key in (("prep", "seeds"), ("backbone", "seed"), ("pretrain", "seed")):
            if isinstance(data.get(section), dict) and key in data[section]:
                # each world sets its own: a value here would be silently ignored
                raise ReplicateConfigError(
                    f"{src}: {section}.{key}: not used when 'worlds' is given (each world "
                    "sets its backbone_seed, pretrain_seed and seeds); remove it"
                )
    methods = [_method(m, i, src) for i, m in enumerate(data["methods"])]
    kwargs: dict[str, Any] = {
        name: _section(cls, data[name], name, src) for name, cls in _SECTIONS.items() if name in data
    }
    top = _section(_TopLevel, {k: data[k] for k in _SCALARS if k in data}, "config", src)
    kwargs.update({k: getattr(top, k) for k in _SCALARS if k in data})
    cfg = ReplicateConfig(variants=variants, methods=methods, worlds=worlds, source=src, **kwargs)
    validate(cfg)
    return cfg


def validate(cfg: ReplicateConfig) -> None:
    src = cfg.source

    def bad(key: str, why: str) -> ReplicateConfigError:
        return ReplicateConfigError(f"{src}: {key}: {why}")

    names = [v.name for v in cfg.variants]
    if len(set(names)) != len(names):
        raise bad("variants", f"duplicate names {names}")
    from data_prep.mixture import mixture_names

    for v in cfg.variants:
        if v.mixture not in mixture_names():
            raise bad("variants", f"unknown mixture {v.mixture!r}; valid: {', '.join(mixture_names())}")
        if v.modes is not None and (not v.modes or set(v.modes) - set(MODES)):
            raise bad(f"variants ({v.name}).modes", f"{v.modes!r}: a non-empty subset of {list(MODES)}")
    labels = [m.label for m in cfg.methods]
    if len(set(labels)) != len(labels):
        raise bad("methods", f"duplicate labels {sorted(x for x in set(labels) if labels.count(x) > 1)}")
    for m in cfg.methods:
        unknown = sorted(set(m.variants or []) - set(names))
        if unknown:
            raise bad(f"methods ({m.label}).variants", f"unknown variant(s) {unknown}; variants: {names}")
    p, a, z = cfg.prep, cfg.adapt, cfg.zero_shot
    if not p.ks or any(not isinstance(k, int) or k < 1 for k in p.ks):
        raise bad("prep.ks", f"{p.ks!r}: a non-empty list of integers >= 1")
    if not p.seeds or len(set(p.seeds)) != len(p.seeds) or any(not isinstance(s, int) for s in p.seeds):
        raise bad("prep.seeds", f"{p.seeds!r}: a non-empty list of distinct integers")
    if not a.lrs or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0 for x in a.lrs):
        raise bad("adapt.lrs", f"{a.lrs!r}: a non-empty list of positive numbers")
    a.lrs = [float(x) for x in a.lrs]
    if a.lr_search_seeds is not None and not 1 <= a.lr_search_seeds <= len(p.seeds):
        raise bad("adapt.lr_search_seeds", f"{a.lr_search_seeds!r}: between 1 and the number of seeds ({len(p.seeds)})")
    for section, keys in (
        (cfg.backbone, ("corpus_size", "val_size", "steps", "micro_batch")),
        (cfg.pretrain, ("steps", "micro_batch")),
        (a, ("steps", "batch_size", "eval_batch_size")),
    ):
        for k in keys:
            if getattr(section, k) < 1:
                raise bad(f"{type(section).__name__}.{k}", "must be >= 1")
    if not 0 < cfg.backbone.mask_ratio < 1:
        raise bad("backbone.mask_ratio", "must be in (0, 1)")
    if cfg.workers < 1:
        raise bad("workers", "must be >= 1")
    unknown = sorted(set(z.variants) - set(names))
    if unknown:
        raise bad("zero_shot.variants", f"unknown variant(s) {unknown}")
    for label in z.methods:
        if label not in labels or not cfg.method(label).is_pretrained():
            raise bad("zero_shot.methods", f"{label!r} is not a pretrained method of this config")
    if any(not isinstance(s, int) or s < 0 for s in z.multitask_steps):
        raise bad("zero_shot.multitask_steps", "integers >= 0")
    _validate_worlds(cfg, bad)
    _validate_pretrain_recipes(cfg, bad)
    if not isinstance(a.max_extensions, int) or a.max_extensions < 0:
        raise bad("adapt.max_extensions", f"{a.max_extensions!r}: an integer >= 0")
    if a.max_extensions and len(a.lrs) < 2:
        raise bad("adapt.max_extensions", "the edge rule needs a grid of at least two learning rates")
    path = cfg.claims_path()
    if path is not None and not path.is_file():
        raise bad("claims", f"{path} not found")


def _validate_worlds(cfg: ReplicateConfig, bad) -> None:
    if cfg.worlds is None:
        return
    names = [w.name for w in cfg.worlds]
    if any(not n or n != _safe_name(n) for n in names) or len(set(names)) != len(names):
        raise bad("worlds", f"names {names}: distinct, non-empty, letters, digits, '_', '-', '.' only")
    seen: dict[int, str] = {}
    for w in cfg.worlds:
        if not w.seeds or any(not isinstance(x, int) or isinstance(x, bool) for x in w.seeds):
            raise bad(f"worlds ({w.name}).seeds", f"{w.seeds!r}: a non-empty list of integers")
        for x in w.seeds:
            if x in seen:
                raise bad(
                    f"worlds ({w.name}).seeds",
                    f"seed {x} is also a seed of world {seen[x]!r}: worlds pool "
                    "their (task, seed) pairs, so their seeds must be distinct",
                )
            seen[x] = w.name
    if cfg.adapt.lr_search_seeds is not None and cfg.adapt.lr_search_seeds > len(cfg.worlds[0].seeds):
        raise bad(
            "adapt.lr_search_seeds",
            f"{cfg.adapt.lr_search_seeds}: more than the first world's {len(cfg.worlds[0].seeds)} seeds",
        )


def _safe_name(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "", text)


def _validate_pretrain_recipes(cfg: ReplicateConfig, bad) -> None:
    from ..engine.lr_search import LrSearchError, LrSearchSection

    p = cfg.pretrain
    if p.lr_search is not None:
        if not isinstance(p.lr_search, dict):
            raise bad(
                "pretrain.lr_search", f"{p.lr_search!r}: a mapping of {sorted(LrSearchSection.__dataclass_fields__)}"
            )
        reject_unknown(
            p.lr_search, LrSearchSection.__dataclass_fields__, f"{cfg.source}: pretrain.lr_search", ReplicateConfigError
        )
        try:
            LrSearchSection(**p.lr_search).validate(f"{cfg.source}: pretrain.lr_search")
        except LrSearchError as err:
            raise ReplicateConfigError(str(err)) from None
    labels = {m.label for m in cfg.methods if m.is_pretrained()}
    if p.untrained_reference is not None and p.untrained_reference not in labels:
        raise bad(
            "pretrain.untrained_reference",
            f"{p.untrained_reference!r} is not a pretrained method; pretrained methods: {sorted(labels)}",
        )
    if not p.untrained_factor > 1:
        raise bad("pretrain.untrained_factor", f"{p.untrained_factor!r}: must be > 1")
    blind_ref = p.untrained_task_blind_reference
    if blind_ref is not None:
        if p.untrained_reference is None:
            raise bad(
                "pretrain.untrained_task_blind_reference", "needs pretrain.untrained_reference (the routed rows')"
            )
        blind = {m.label for m in cfg.methods if m.is_pretrained() and cfg.task_blind(m)}
        if blind_ref not in blind:
            raise bad(
                "pretrain.untrained_task_blind_reference",
                f"{blind_ref!r} is not a task-blind pretrained method; task-blind methods: {sorted(blind)}",
            )
    if p.sensitivity and p.lr_search is None:
        raise bad("pretrain.sensitivity", "true, but there is no pretrain.lr_search to check")
    _check_run_config(p.run_config, f"{cfg.source}: pretrain.run_config")
    for m in cfg.methods:
        if m.pretrain is None:
            continue
        where = f"methods ({m.label}).pretrain"
        if not m.is_pretrained():
            raise bad(where, "a fresh method has no pretraining recipe")
        if not isinstance(m.pretrain, dict):
            raise bad(where, f"{m.pretrain!r}: a mapping of {list(METHOD_PRETRAIN_KEYS)}")
        reject_unknown(m.pretrain, METHOD_PRETRAIN_KEYS, f"{cfg.source}: {where}", ReplicateConfigError)
        if m.pretrain.get("optimizer", "adamw") not in ("adamw", "adafactor"):
            raise bad(f"{where}.optimizer", f"{m.pretrain['optimizer']!r}: adamw or adafactor")
        if "run_config" in m.pretrain:
            _check_run_config(m.pretrain["run_config"], f"{cfg.source}: {where}.run_config")
        if m.pretrain.get("search") and p.lr_search is None:
            raise bad(f"{where}.search", "true, but the config has no pretrain.lr_search grid")
        for key in ("module_lr", "routing_lr"):
            v = m.pretrain.get(key, 1.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise bad(f"{where}.{key}", f"{v!r}: a positive number")


def _check_run_config(overrides: Any, where: str) -> None:
    """Embedded run-config keys: dotted keys of tensorpoly_ds.engine.config.RunConfig with values of their
    types (checked by the same machinery as a run config's overrides), none of PER_RUN_KEYS."""
    import typing

    from ..engine.config import RunConfig

    if not isinstance(overrides, dict):
        raise ReplicateConfigError(
            f"{where}: expected a mapping of run-config keys (e.g. train.log_every: 10), got {overrides!r}"
        )
    data: dict = {}
    sources: dict = {}
    for key, value in overrides.items():
        if any(key == k or key.startswith(k + ".") for k in PER_RUN_KEYS):
            raise ReplicateConfigError(f"{where}: key '{key}' is set per run (one of {', '.join(PER_RUN_KEYS)})")
        apply_override(data, str(key).split("."), value, sources, where, ReplicateConfigError)
    sections = typing.get_type_hints(RunConfig)
    reject_unknown(data, sections, where, ReplicateConfigError, what="section")
    for name, body in data.items():
        build(sections[name], body, name, sources, ReplicateConfigError)


def load_config(path: str | Path, overrides: dict | None = None, sets: Sequence[str] = ()) -> ReplicateConfig:
    """The config of `path`, its top-level keys replaced by `overrides`, then the dotted `key=value` of `sets`
    (e.g. adapt.steps=2; tpds_common.config), validated."""
    data = read_yaml(path, ReplicateConfigError)
    data.update(overrides or {})
    apply_overrides(data, sets, {}, ReplicateConfigError)
    return build_config(data, str(path))
