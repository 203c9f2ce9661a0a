"""What an adaptation job is: the AdaptJob fields, their validation and the files that mark a job's state.

Pure Python (no torch): `tensorpoly-ds adapt` resolves and checks a job with it before anything heavy is
imported, so that an impossible job is refused in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpds_common.config import ADDED_LATER, check_fields, parse_value, stable_asdict
from tpds_common.errors import BusyError, ConfigError

RESULT_FILE = "result.json"
MARKER_FILE = "COMPLETE"
FULLFT = "fullft"
RESULT_FORMAT = 1
BATCHINGS = ("random", "length_grouped")  # the names of the engine's data.batching (engine.data)
EVAL_BATCHINGS = ("in_order", "length_sorted")
# Job fields added after results were published: at their default they stay out of to_dict (job.json,
# result.json, job tables), so those records and every comparison with them keep their bytes.
_LATER = {ADDED_LATER: True}


class JobError(ConfigError):
    """The job description is invalid or does not fit the data / export."""


class JobBusy(JobError, BusyError):
    """Another live process holds the job's folder (its lock)."""


@dataclass
class AdaptJob:
    # what to adapt
    out_dir: str
    data_dir: str
    task: str
    seed: int = 0
    k: int | None = None  # shots; None = the only k prepared for the task; 0 = zero-shot
    mode: str = "full"  # full | z | mu
    export: str | None = None  # pretrained adapter export (safetensors + adapter_config.json)
    method: str | None = None  # without export: "fullft" or an adapter method (fresh, w/o pretraining)
    adapter: dict = field(default_factory=dict)  # AdapterConfig fields for a fresh adapter
    label: str | None = None  # row name in reports (default: derived from the method)
    model: str = "tiny"  # backbone: architecture name (built from config) or HF name / path
    model_seed: int | None = None  # init seed of a backbone built from an architecture name: the
    # export's backbone.init_seed if recorded, else 42 (= the seed
    # stage 2 seeds with before building it, train.seed default)
    collapse: bool = False  # mu on Poly/MHR: collapse the uniform mixture into one LoRA first
    # few-shot recipe (reference: Adafactor 3e-3, 1000 steps, warmup 6 %, clip 1, batch 8)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    routing_lr: float | None = None  # default: lr
    warmup_ratio: float = 0.06
    clip: float = 1.0
    optimizer: str = "adafactor"  # adafactor | adamw
    loss_lm: float = 1.0
    loss_mc: float = 1.0
    loss_unlikelihood: float = 1.0
    # evaluation
    eval_every: int = 100  # steps; 0 = only at the end (and before training if eval_at_start)
    eval_at_start: bool = False
    eval_batch_size: int = 16
    length_norm: float = 1.0  # rank-classification score: NLL / len ** length_norm (t-zero: 0)
    max_eval_examples: int | None = None  # cap on eval rows (smoke runs); None = all
    # zero-shot MHR-mu recipe: extra multi-task LM steps on DIR/train before (or instead of) few-shot training
    multitask_steps: int = 0
    multitask_batch_size: int = 8
    multitask_lr: float | None = None  # default: lr
    save_adapter: bool = False  # also export the adapted adapter to OUT/adapter
    # training loop: "local" (one process, plain PyTorch), "engine" (tensorpoly_ds.engine on DeepSpeed, any
    # number of ranks, ZeRO 0-3), "auto" (engine when installed)
    trainer: str = "auto"
    zero_stage: int = 0  # engine trainer only
    precision: str = "fp32"  # engine trainer only: fp32 | bf16
    # Length-aware batching (docs/adapt.md). Training (both phases): `length_grouped` sorts windows of
    # group_size batches of the seeded order by length, so rows of similar length share a step. Evaluation:
    # `length_sorted` scores the eval rows in order of length; records keep the row order. The defaults are the
    # order every published result was made with; the T0 sweep grid turns both on.
    batching: str = field(default="random", metadata=_LATER)
    group_size: int = field(default=4, metadata=_LATER)
    eval_batching: str = field(default="in_order", metadata=_LATER)
    # Forward passes per batch (training and evaluation): 0 = one; N = chunks of examples of similar length of at
    # most N padded input + decoder slots each (evaluation.chunking), so that a chunk pads only to its own
    # lengths. The same loss and scores up to rounding. Not with ZeRO-3 (ranks would gather parameters a
    # different number of times).
    chunk_tokens: int = field(default=0, metadata=_LATER)

    def __post_init__(self) -> None:
        if self.mode not in ("full", "z", "mu"):
            raise JobError(f"job field 'mode' = {self.mode!r}: valid modes: full, z, mu")
        if self.export is None and self.method is None:
            raise JobError("a job needs 'export' (pretrained adapters) or 'method' (fullft or a fresh adapter)")
        for name in ("steps", "multitask_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise JobError(f"job field {name!r} = {getattr(self, name)!r}: must be >= 0")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "multitask_batch_size"):
            if getattr(self, name) < 1:
                raise JobError(f"job field {name!r} = {getattr(self, name)!r}: must be >= 1")
        if self.k is not None and self.k < 0:
            raise JobError(f"job field 'k' = {self.k!r}: must be >= 0")
        if self.optimizer not in ("adafactor", "adamw"):
            raise JobError(f"job field 'optimizer' = {self.optimizer!r}: valid: adafactor, adamw")
        if self.trainer not in ("auto", "local", "engine"):
            raise JobError(f"job field 'trainer' = {self.trainer!r}: valid: auto, local, engine")
        if self.zero_stage not in (0, 1, 2, 3):
            raise JobError(f"job field 'zero_stage' = {self.zero_stage!r}: valid: 0, 1, 2, 3")
        if self.batching not in BATCHINGS:
            raise JobError(f"job field 'batching' = {self.batching!r}: valid: {', '.join(BATCHINGS)}")
        if self.group_size < 1:
            raise JobError(f"job field 'group_size' = {self.group_size!r}: must be >= 1 (batches sorted together)")
        if self.eval_batching not in EVAL_BATCHINGS:
            raise JobError(f"job field 'eval_batching' = {self.eval_batching!r}: valid: {', '.join(EVAL_BATCHINGS)}")
        if self.chunk_tokens < 0:
            raise JobError(f"job field 'chunk_tokens' = {self.chunk_tokens!r}: must be >= 0 (0: one pass per batch)")
        if self.chunk_tokens and self.zero_stage == 3:
            raise JobError(
                f"job field 'chunk_tokens' = {self.chunk_tokens!r} needs zero_stage < 3: under ZeRO-3 every rank "
                "must run the same number of forward passes; set chunk_tokens: 0"
            )
        if self.method == FULLFT and self.mode != "full":
            raise JobError(f"FullFT has no routing: mode must be 'full', got {self.mode!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "job") -> AdaptJob:
        """Unknown fields and values of the wrong type are refused naming `source` (tpds_common.config)."""
        kwargs = check_fields(cls, data, source, JobError, what="job field")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
        ]
        if missing:
            raise JobError(f"{source}: missing job field(s) {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return stable_asdict(self)


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True only if the marker exists and result.json says complete (a crash before either = rerun)."""
    out = Path(out_dir)
    if not (out / MARKER_FILE).is_file():
        return False
    try:
        return json.loads((out / RESULT_FILE).read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


# run-config keys `accelerate launch` can set (engine.distributed.accelerate_overrides) -> job fields
LAUNCHER_JOB_FIELDS = {
    "deepspeed.zero_stage": "zero_stage",
    "deepspeed.precision": "precision",
    "train.grad_accum": "grad_accum",
    "optim.clip": "clip",
}


def launcher_job_fields(env=None) -> dict[str, Any]:
    """Job fields for what `accelerate launch`'s DeepSpeed plugin configured (empty for other launchers): the
    engine trainer with the plugin's ZeRO stage and precision. Offload and a DeepSpeed config file have no
    job field and are refused."""
    from ..engine.distributed import LaunchError, accelerate_overrides

    overrides = accelerate_overrides(env)
    fields: dict[str, Any] = {"trainer": "engine"} if overrides else {}
    for item in overrides:
        key, _, raw = item.partition("=")
        value = parse_value(raw)
        if key in LAUNCHER_JOB_FIELDS:
            fields[LAUNCHER_JOB_FIELDS[key]] = value
        elif value not in (False, None):
            raise LaunchError(
                f"accelerate launch sets {item}, which adaptation jobs do not support (no offload, "
                "no DeepSpeed config file: jobs build theirs from ds_configs/)"
            )
    return fields
