"""One few-shot adaptation job: (pretrained adapter export, mode, held-out task, seed, k) -> result.json.

Output directory of a job:
    job.json             the job as run (written first)
    progress.json        evaluations so far (rewritten after each evaluation)
    predictions.jsonl    per-example predictions and choice scores of the final evaluation
    predictions_best.jsonl   the same for the best evaluation
    routing.safetensors  routing logits and weights of the adapted task (routed methods)
    result.json          config, accuracy at every evaluation, best, final, per template, parameter counts,
                         timings; status "complete", "failed", "interrupted" or "requeue" (stopped with a
                         checkpoint: the evaluations and losses so far, which the next run continues)
    COMPLETE             completion marker, written after result.json; a job is skipped only if both exist
    local_checkpoint.pt, engine/<phase>/checkpoints/   the training state of a stopped job (removed when complete)
    .tpds.lock, .tpds.lock.json   the folder lock of the process running the job, and who that is
All files are written atomically (temp file, then os.replace).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import random
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tpds_common.files import atomic_output, atomic_write_json, atomic_write_text
from tpds_common.locking import FolderLock, LockHeld
from tpds_common.log import get_logger

from ..adapters import (
    AdapterConfig,
    ModeError,
    adapter_layers,
    check_mode,
    collapse_to_lora,
    inject_adapters,
    load_adapters,
    prepare_adaptation,
    read_export_meta,
    routing_tables,
)
from ..engine.loop import TRAIN_LOSS, train_key
from ..engine.stop import STOP
from ..evaluation import (
    LossWeights,
    accuracy,
    collate_choices,
    collate_lm,
    evaluate,
    length_keys,
    length_order,
    lm_loss,
    tfew_losses,
    write_jsonl,
)
from .local_train import (
    CHECKPOINT_FILE,
    EpochSampler,
    LocalCheckpointError,
    LocalTrainer,
    build_optimizer,
    load_checkpoint,
)
from .spec import FULLFT, MARKER_FILE, RESULT_FILE, RESULT_FORMAT, AdaptJob, JobBusy, JobError, is_complete  # noqa: F401

log = get_logger("adapt")

# --- small utilities ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def method_label(job: AdaptJob, cfg: AdapterConfig | None) -> str:
    if job.label:
        return job.label
    if cfg is None:
        return "FullFT"
    names = {
        "lora": "LoRA",
        "tlora": "TLoRA",
        "poly": "Poly",
        "mhr": "MHR",
        "tensorpoly_i": "TensorPoly-I",
        "tensorpoly_ii": "TensorPoly-II",
        "tensorpoly_x": "TensorPoly-X",
        "ia3": "(IA)^3",
    }
    name = names.get(cfg.method, cfg.method)
    if cfg.method in ("tlora", "tensorpoly_i", "tensorpoly_ii", "tensorpoly_x"):
        name += f" R{cfg.tensor_rank} N{cfg.order}"
    if cfg.routing == "random":
        name = f"Random-mu ({name})"
    if job.export is None:
        name += " (w/o pretrain)"
    return name


# --- data --------------------------------------------------------------------------------------------------


def open_data(data_dir: str):
    from data_prep.manifest import read_manifest

    return read_manifest(data_dir)


def load_rows(data_dir: str, split: str) -> list[dict]:
    from data_prep.manifest import load_split

    ds = load_split(data_dir, split)
    cols = ds.to_dict()
    names = list(cols)
    return [{c: cols[c][i] for c in names} for i in range(len(ds))]


def resolve_k(manifest, data_dir: str, task: str, k: int | None) -> int:
    prefix = f"few_shot/{task}/"
    ks = sorted({int(s[len(prefix) :].split("_shot")[0]) for s in manifest.shards if s.startswith(prefix)})
    if k is None:
        if len(ks) != 1:
            raise JobError(f"{data_dir}: task {task!r} has few-shot sets for k in {ks}; set k explicitly")
        return ks[0]
    if k > 0 and k not in ks:
        raise JobError(f"{data_dir}: no {k}-shot set for task {task!r}; prepared: {ks or 'none'}")
    return k


# --- model -------------------------------------------------------------------------------------------------

DEFAULT_MODEL_SEED = 42


def backbone_seed(job: AdaptJob) -> int:
    if job.model_seed is not None:
        return job.model_seed
    if job.export is not None:
        try:
            seed = (read_export_meta(job.export).get("backbone") or {}).get("init_seed")
        except Exception:  # a missing export is reported by load_adapters with a better message
            seed = None
        if seed is not None:
            return int(seed)
    return DEFAULT_MODEL_SEED


def build_backbone(job: AdaptJob, vocab_size: int, zero3_config: dict | None = None) -> nn.Module:
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    from ..models import KNOWN_ARCHITECTURES, t5_config

    if job.model in KNOWN_ARCHITECTURES:
        # Deterministic init: the pretraining run must have built the same backbone (same name, vocab, seed):
        # stage 2 seeds torch with train.seed and then builds the model, which this reproduces exactly.
        state = torch.random.get_rng_state()
        torch.manual_seed(backbone_seed(job))
        model = T5ForConditionalGeneration(t5_config(job.model, vocab_size=vocab_size))
        torch.random.set_rng_state(state)
        return model
    if zero3_config is not None:
        # ZeRO-3: load straight into partitions (zero.Init) instead of a full copy per rank (REFERENCE
        # pitfall 5); the HfDeepSpeedConfig must stay alive until deepspeed.initialize
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(zero3_config)
        model = AutoModelForSeq2SeqLM.from_pretrained(job.model, dtype=torch.float32)
        object.__setattr__(model, "_tpds_ds_keepalive", keepalive)
        return model
    return AutoModelForSeq2SeqLM.from_pretrained(job.model, dtype=torch.float32)


def numel(p: torch.Tensor) -> int:
    """Full element count, also for ZeRO-3 partitioned parameters (whose numel() is 0; pitfall 3)."""
    return int(getattr(p, "ds_numel", p.numel()))


def count_adapter_params(model: nn.Module) -> dict[str, int]:
    tables = routing_tables(model)
    routing_ids = {id(t.logits) for t in tables.values()}
    modules = 0
    seen: set[int] = set()
    for layer in adapter_layers(model).values():
        for pname, p in layer.named_parameters():
            if pname.startswith("base.") or id(p) in seen or id(p) in routing_ids:
                continue
            seen.add(id(p))
            modules += numel(p)
    routing = sum(numel(t.logits) for t in tables.values())
    return {"modules": modules, "routing": routing, "total": modules + routing}


def _architectures():
    from ..models import KNOWN_ARCHITECTURES

    return KNOWN_ARCHITECTURES


def setup_model(job: AdaptJob, vocab_size: int, zero3_config: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Backbone + adapters (pretrained export or fresh) + adaptation mode. Returns (model, info)."""
    if job.export is not None:  # a mode the export cannot run fails before the backbone is built
        check_mode(AdapterConfig.from_dict(read_export_meta(job.export)["adapter"]), job.mode, source=job.export)
    model = build_backbone(job, vocab_size, zero3_config)
    info: dict[str, Any] = {
        "backbone_params": sum(numel(p) for p in model.parameters()),
        "backbone_seed": backbone_seed(job) if job.model in _architectures() else None,
    }
    cfg = None
    if job.export is not None:
        meta = load_adapters(model, job.export)
        cfg = model.tpds_adapter_config
        if job.method is not None and job.method != cfg.method:
            raise JobError(f"job method {job.method!r} differs from the export's {cfg.method!r} ({job.export})")
        info["export_tasks"] = len(meta.get("tasks", []))
        info["multi_task_params"] = count_adapter_params(model)
    elif job.method == FULLFT:
        for p in model.parameters():
            p.requires_grad_(True)
        info["multi_task_params"] = None
    else:
        cfg = AdapterConfig.from_dict({"method": job.method, **job.adapter}, source="job.adapter")
        inject_adapters(model, cfg, num_tasks=1)
        info["multi_task_params"] = None
    if cfg is not None:
        if cfg.routed:
            prepare_adaptation(model, job.mode)
            if job.collapse:
                if job.mode != "mu":
                    raise JobError("collapse applies to mode mu only (uniform routing is one LoRA)")
                collapse_to_lora(model)
        elif job.mode != "full":
            raise ModeError(f"method {cfg.method!r} has no routing, so mode {job.mode!r} does not apply; use 'full'")
        else:
            prepare_adaptation(model, "full")
    info["method"] = cfg.method if cfg is not None else FULLFT
    info["adapter"] = cfg.to_dict() if cfg is not None else None
    info["label"] = method_label(job, cfg)
    info["trainable_params"] = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return model, info


def routing_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Logits and evaluation weights of task 0 for every routing table."""
    out = {}
    for key, table in routing_tables(model).items():
        was = table.training
        table.eval()
        with torch.no_grad():
            out[f"{key}.weights"] = table.weights(torch.tensor([0]))[0].detach().cpu().contiguous()
            out[f"{key}.logits"] = table.logits[0].detach().cpu().contiguous()
        table.train(was)
    return out


# --- the job -----------------------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj):
    if _rank_world()[1] > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def engine_available() -> bool:
    """Whether this package tree has its stage-2 engine (tensorpoly_ds.engine). False only where the
    subpackage is absent, or where the importable one belongs to another checkout (an editable install of
    another tree). An engine that is there but does not import (a broken DeepSpeed, an error in the
    engine's own code) is a JobError naming the cause: `trainer: auto` must not quietly fall back to the
    local loop on a broken install."""
    import tensorpoly_ds

    spec = importlib.util.find_spec(f"{tensorpoly_ds.__name__}.engine")
    here = Path(tensorpoly_ds.__file__).resolve().parent
    if spec is None or spec.origin is None or not Path(spec.origin).resolve().is_relative_to(here):
        return False
    try:
        importlib.import_module(f"{tensorpoly_ds.__name__}.engine.trainer")
    except ImportError as err:
        raise JobError(
            f"{Path(spec.origin).parent} is installed but does not import ({type(err).__name__}: "
            f"{err}); repair the install (pip install -e .) or set trainer 'local'"
        ) from err
    return True


def resolve_trainer(job: AdaptJob) -> str:
    if job.trainer == "auto":
        return "engine" if engine_available() else "local"
    if job.trainer == "engine" and not engine_available():
        raise JobError("job field 'trainer' = 'engine' but tensorpoly_ds.engine is not installed")
    return job.trainer


def run_job(job: AdaptJob, *, force: bool = False) -> dict:
    """Run one job (skipped if complete unless force). Returns the result dict. On error a result with
    status "failed" is written (no marker) and the exception re-raised.

    Stop requests (SIGTERM/SIGINT/SIGUSR1, see tensorpoly_ds.engine.stop) end training after the current
    step: the job checkpoints in its folder and returns a result with status "requeue" (result.json says
    so, no marker); the next run_job of the same job resumes from that checkpoint. A job that crashed or
    was killed restarts from scratch. `force` reruns a complete job and discards a stopped one.

    One live process per job folder: a folder lock (tpds_common.locking) refuses a second one (JobBusy).
    With the engine trainer the job may run on several ranks (torchrun / srun): every rank calls run_job,
    rank 0 alone holds the lock and writes files."""
    out = Path(job.out_dir)
    trainer = resolve_trainer(job)
    if trainer == "engine":
        from ..engine.distributed import init_distributed

        init_distributed()
    rank, _ = _rank_world()
    lock = FolderLock(out, what="adaptation job") if rank == 0 else None
    busy = None
    if lock is not None:
        try:
            lock.acquire()
        except LockHeld as err:
            busy = str(err)
    busy = _broadcast(busy)
    if busy:
        raise JobBusy(busy)
    try:
        with STOP.handling():  # launch/adapt installs it at start-up; library callers get it here
            return _run_locked(job, out, trainer, force)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(job: AdaptJob, out: Path, trainer: str, force: bool) -> dict:
    main_rank = _rank_world()[0] == 0
    complete = _broadcast(not force and is_complete(out))
    if complete:
        if main_rank:
            log.info(f"{out}: complete, skipped")
        return json.loads((out / RESULT_FILE).read_text())
    prior, refused = None, None
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER_FILE).unlink(missing_ok=True)
        try:
            prior = stopped_state(out, job, force)
            atomic_write_json(out / "job.json", job.to_dict())
        except JobError as err:  # every rank must learn it, or the others wait in the broadcast forever
            refused = str(err)
    prior, refused = _broadcast((prior, refused))
    if refused:
        raise JobError(refused)
    if prior is not None:
        log.info(f"{out}: resuming the run stopped at {prior['stopped']['phase']} step {prior['stopped']['step']}")
    t_start = time.time()
    timings: dict[str, float] = {}
    try:
        result = _run(job, out, timings, trainer, prior)
    except BaseException as err:
        if main_rank:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            atomic_write_json(
                out / RESULT_FILE,
                {
                    "format": RESULT_FORMAT,
                    "status": status,
                    "job": job.to_dict(),
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                    "timings": timings,
                    "finished": time.time(),
                },
            )
        raise
    timings["total_s"] = time.time() - t_start + (prior or {}).get("timings", {}).get("total_s", 0.0)
    result["timings"] = timings
    if main_rank:
        atomic_write_json(out / RESULT_FILE, result)
        if result["status"] == "complete":
            atomic_write_text(out / MARKER_FILE, "complete\n")  # last: its presence means result.json is final
            discard_checkpoints(out)
        else:
            log.info(
                f"stopped ({result['signal']}) at {result['stopped']['phase']} step "
                f"{result['stopped']['step']}: checkpoint kept in {out}; rerun the job to resume"
            )
    return result


def discard_checkpoints(out: Path) -> None:
    """The training state of an unfinished run (local loop and engine), which only a stopped run resumes."""
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    for sub in ("multitask", "fewshot"):
        shutil.rmtree(out / "engine" / sub / "checkpoints", ignore_errors=True)


def stopped_state(out: Path, job: AdaptJob, force: bool) -> dict | None:
    """The saved state of a stopped ("requeue") run of this very job, which this run continues; None for a
    fresh start (checkpoints of a crashed or killed run are discarded: it restarts from scratch)."""
    try:
        saved = json.loads((out / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        saved = None
    if force or not isinstance(saved, dict) or saved.get("status") != "requeue":
        discard_checkpoints(out)
        return None
    before, now = saved.get("job") or {}, job.to_dict()
    diff = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in now.items() if before.get(k) != v]
    if diff:
        raise JobError(
            f"{out} holds a stopped run of a different job ({'; '.join(diff)}); rerun the original job "
            "to resume it, or add --force to start this one over"
        )
    return saved


@dataclass
class JobData:
    manifest: Any
    k: int
    eval_rows: list[dict]
    train_rows: list[dict]


@dataclass
class Trained:
    """What training left: the network to evaluate and snapshot (the DeepSpeed engine on that path), the
    ZeRO-3 gather context factory (or None), per-step metrics of both phases, and the stop point if any."""

    net: nn.Module
    gather: Callable | None = None
    history: list[dict] = field(default_factory=list)
    multitask_history: list[dict] = field(default_factory=list)
    stopped: dict | None = None  # {"phase", "step"} when a stop request ended training


def _run(job: AdaptJob, out: Path, timings: dict, trainer: str, prior: dict | None = None) -> dict:
    """Data, model, training (the loop's local or engine backend), then the requeue or the final result."""
    rank, world = _rank_world()
    data = load_job_data(job, timings, rank == 0)
    model, info = build_job_model(job, data, trainer, world, timings)
    log.info(
        f"{info['label']} mode={job.mode} task={job.task} k={data.k} seed={job.seed} trainer={trainer} "
        f"world={world}: {info['trainable_params']:,} trainable parameters"
    )
    prior = prior or {}
    resumed_in = (prior.get("stopped") or {}).get("phase")  # None, "multitask" or "fewshot"
    steps = job.steps if data.k > 0 else 0
    evals = Evaluations(job, out, data.eval_rows, steps, rank == 0, prior.get("evaluations", []))
    train = train_local if trainer == "local" else train_engine
    trained = train(job, model, out, data, steps, evals, resumed_in, timings)
    timings["eval_s"] = evals.seconds
    losses = loss_records(prior, trained)
    if trained.stopped is not None:
        return requeue_result(job, trainer, world, trained, evals, losses)
    routing = save_routing_and_adapter(job, out, trained, info, rank == 0)
    return complete_result(job, trainer, world, data.k, info, evals, losses, routing)


def load_job_data(job: AdaptJob, timings: dict, main_rank: bool) -> JobData:
    t0 = time.time()
    manifest = open_data(job.data_dir)
    if job.task not in manifest.held_out and main_rank:  # the same on every rank: say it once
        log.warning(f"warning: task {job.task!r} is not in the manifest's held_out list {manifest.held_out}")
    k = resolve_k(manifest, job.data_dir, job.task, job.k)
    eval_rows = load_rows(job.data_dir, f"eval/{job.task}")
    if job.max_eval_examples is not None:
        eval_rows = eval_rows[: job.max_eval_examples]
    train_rows = load_rows(job.data_dir, f"few_shot/{job.task}/{k}_shot/{job.seed}_seed") if k > 0 else []
    timings["data_s"] = time.time() - t0
    return JobData(manifest, k, eval_rows, train_rows)


def build_job_model(job: AdaptJob, data: JobData, trainer: str, world: int, timings: dict):
    """Seeds, then backbone + adapters + mode (setup_model). Returns (model, info)."""
    t0 = time.time()
    seed_everything(job.seed)
    zero3_config = None
    if trainer == "engine" and job.zero_stage == 3 and job.model not in _architectures():
        from .engine_train import ds_config_for

        zero3_config = ds_config_for(job, max(1, job.steps if data.k > 0 else job.multitask_steps), world)
    model, info = setup_model(job, data.manifest.tokenizer["vocab_size"], zero3_config)
    timings["setup_s"] = time.time() - t0
    return model, info


class Evaluations:
    """The job's rank-classification evaluations: called with (network, step) on every rank (same number of
    forward passes), rank 0 writes predictions and progress.json. Starts from a stopped run's evaluations."""

    def __init__(self, job: AdaptJob, out: Path, eval_rows: list[dict], steps: int, main_rank: bool, prior: list[dict]):
        self.job, self.out, self.eval_rows, self.steps = job, out, eval_rows, steps
        self.main_rank = main_rank
        self.entries: list[dict] = list(prior)
        self.best: dict | None = None
        for entry in self.entries:  # the stopped run's evaluations, with the rule __call__ applies
            if self.best is None or entry["accuracy"] > self.best["accuracy"]:
                self.best = entry
        self.seconds = 0.0
        self.order = length_order(eval_rows) if job.eval_batching == "length_sorted" else None

    def __call__(self, net: nn.Module, step: int) -> dict:
        job, out = self.job, self.out
        t = time.time()
        phase = "final" if step == self.steps else ("start" if step == 0 else "periodic")
        records = evaluate(
            net,
            self.eval_rows,
            batch_size=job.eval_batch_size,
            length_norm=job.length_norm,
            task_id=0,
            order=self.order,
            chunk_tokens=job.chunk_tokens,
        )
        acc = accuracy(records)
        entry = {
            "step": step,
            "phase": phase,
            "accuracy": acc["accuracy"],
            "examples": acc["examples"],
            "per_template": acc["per_template"].get(job.task, {}),
        }
        self.entries.append(entry)
        improved = self.best is None or entry["accuracy"] > self.best["accuracy"]
        if improved:
            self.best = entry
        if self.main_rank:
            write_jsonl(out / "predictions.jsonl", records)
            if improved:
                write_jsonl(out / "predictions_best.jsonl", records)
            atomic_write_json(out / "progress.json", {"evaluations": self.entries})
        self.seconds += time.time() - t
        log.info(f"step {step} ({phase}): accuracy {entry['accuracy']:.4f} on {entry['examples']} examples")
        return {"eval/accuracy": entry["accuracy"]}


def _eval_at_start(job: AdaptJob, steps: int, resumed_in: str | None) -> bool:
    # the start evaluation comes after the multi-task steps: a run stopped during few-shot training did it
    return (job.eval_at_start or steps == 0) and resumed_in != "fewshot"


def _loss_weights(job: AdaptJob) -> LossWeights:
    return LossWeights(lm=job.loss_lm, mc=job.loss_mc, unlikelihood=job.loss_unlikelihood)


def train_local(
    job: AdaptJob,
    model: nn.Module,
    out: Path,
    data: JobData,
    steps: int,
    evals: Evaluations,
    resumed_in: str | None,
    timings: dict,
) -> Trained:
    """The loop's local backend (one process, no DeepSpeed): multi-task steps, start evaluation, few-shot
    steps with their evaluations. A stopped run resumes from OUT/local_checkpoint.pt."""
    if _rank_world()[1] > 1:
        raise JobError("the local trainer runs one process; use trainer 'engine' for several ranks")
    ckpt_path = out / CHECKPOINT_FILE
    state = _local_resume_state(ckpt_path, resumed_in)
    trained = Trained(net=model)
    if job.multitask_steps > 0 and resumed_in != "fewshot":
        t0 = time.time()
        trained.multitask_history, at = _local_multitask(
            job, model, ckpt_path, state if resumed_in == "multitask" else None
        )
        timings["multitask_s"] = time.time() - t0
        if at is not None:
            trained.stopped = {"phase": "multitask", "step": at}
            return trained
    if _eval_at_start(job, steps, resumed_in):
        evals(model, 0)
    if steps > 0:
        t0 = time.time()
        trained.history, at = _local_fewshot(
            job, model, ckpt_path, data.train_rows, steps, evals, state if resumed_in == "fewshot" else None
        )
        timings["train_s"] = time.time() - t0 - evals.seconds
        if at is not None:
            trained.stopped = {"phase": "fewshot", "step": at}
    return trained


def _local_resume_state(ckpt_path: Path, resumed_in: str | None) -> dict | None:
    if resumed_in is None:
        return None
    if not ckpt_path.is_file():
        raise LocalCheckpointError(
            f"{ckpt_path} is missing: the stopped run cannot be resumed; rerun with --force to start the job over"
        )
    return load_checkpoint(ckpt_path)


def job_sampler(job: AdaptJob, rows: list[dict], batch_size: int, seed: int) -> EpochSampler:
    """The local trainer's sampler of `rows` in the job's batching (random: no lengths are read)."""
    lengths = length_keys(rows) if job.batching == "length_grouped" and rows else None
    return EpochSampler(len(rows), batch_size, seed, lengths=lengths, group_size=job.group_size)


def _local_multitask(job: AdaptJob, model: nn.Module, ckpt_path: Path, state: dict | None):
    mt_rows = load_rows(job.data_dir, "train")
    sampler = job_sampler(job, mt_rows, job.multitask_batch_size, job.seed + 1)
    optimizer = build_optimizer(model, job.optimizer, job.multitask_lr or job.lr, job.routing_lr)
    # All rows use routing row 0: the uniform / freshly opened routing of the adapted model.
    loop = LocalTrainer(
        model,
        steps=job.multitask_steps,
        sampler=sampler,
        make_batch=lambda idx: collate_lm([mt_rows[i] for i in idx], 0),
        loss_fn=lambda b: {"loss": lm_loss(model, b)},
        optimizer=optimizer,
        warmup_ratio=job.warmup_ratio,
        clip=job.clip,
        stop=STOP,
        checkpoint=ckpt_path,
        phase="multitask",
    )
    return loop.run(state)


def _local_fewshot(
    job: AdaptJob,
    model: nn.Module,
    ckpt_path: Path,
    train_rows: list[dict],
    steps: int,
    evals: Evaluations,
    state: dict | None,
):
    sampler = job_sampler(job, train_rows, job.batch_size, job.seed)
    optimizer = build_optimizer(model, job.optimizer, job.lr, job.routing_lr)
    weights = _loss_weights(job)

    def on_step(step: int, metrics: dict) -> None:
        if step == steps or (job.eval_every and step % job.eval_every == 0):
            evals(model, step)

    loop = LocalTrainer(
        model,
        steps=steps,
        sampler=sampler,
        make_batch=lambda idx: collate_choices([train_rows[i] for i in idx], 0),
        loss_fn=lambda b: tfew_losses(model, b, weights, job.chunk_tokens),
        optimizer=optimizer,
        warmup_ratio=job.warmup_ratio,
        clip=job.clip,
        grad_accum=job.grad_accum,
        on_step=on_step,
        stop=STOP,
        checkpoint=ckpt_path,
        phase="fewshot",
    )
    return loop.run(state)


def train_engine(
    job: AdaptJob,
    model: nn.Module,
    out: Path,
    data: JobData,
    steps: int,
    evals: Evaluations,
    resumed_in: str | None,
    timings: dict,
) -> Trained:
    """The loop's DeepSpeed backend (engine.trainer.Trainer), on every rank of the job."""
    from .engine_train import engine_train

    t0 = time.time()
    net, gather, history, multitask_history, stopped = engine_train(
        job,
        model,
        out,
        steps=steps,
        train_rows=data.train_rows,
        weights=_loss_weights(job),
        run_eval=evals,
        world=_rank_world()[1],
        data_dir=job.data_dir,
        resumed_in=resumed_in,
        eval_at_start=_eval_at_start(job, steps, resumed_in),
    )
    timings["train_s"] = time.time() - t0 - evals.seconds
    return Trained(net, gather, history, multitask_history, stopped)


def loss_records(prior: dict, trained: Trained) -> dict[str, list[dict]]:
    """result.json's per-step losses (its own keys: loss, lm, mc, unlikelihood) from the loop's metrics, after
    a stopped run's."""
    train_loss = prior.get("train_loss", []) + [
        {
            "step": h["step"],
            "loss": h.get(TRAIN_LOSS),
            "lm": h.get(train_key("lm")),
            "mc": h.get(train_key("mc")),
            "unlikelihood": h.get(train_key("unlikelihood")),
        }
        for h in trained.history
    ]
    multitask_loss = prior.get("multitask_loss", []) + [
        {"step": h["step"], "loss": h.get(TRAIN_LOSS)} for h in trained.multitask_history
    ]
    return {"train_loss": train_loss, "multitask_loss": multitask_loss}


def requeue_result(job: AdaptJob, trainer: str, world: int, trained: Trained, evals: Evaluations, losses: dict) -> dict:
    """The state a rerun resumes from (stopped_state): everything the final result accumulates."""
    return {
        "format": RESULT_FORMAT,
        "status": "requeue",
        "job": job.to_dict(),
        "trainer": trainer,
        "world_size": world,
        "stopped": trained.stopped,
        "signal": STOP.name or "stop request",
        "evaluations": evals.entries,
        **losses,
        "finished": time.time(),
    }


def save_routing_and_adapter(job: AdaptJob, out: Path, trained: Trained, info: dict, main_rank: bool) -> bool:
    """routing.safetensors (routed methods) and, with save_adapter, the adapted adapter export. Collective under
    ZeRO-3 (every rank). Returns whether a routing file was written."""
    net, gather = _unwrap(trained.net), trained.gather
    tables = [t.logits for t in routing_tables(net).values()]
    with gather(tables) if gather else contextlib.nullcontext():  # ZeRO-3: a collective, every rank
        routing = routing_snapshot(net)
    if routing and main_rank:
        from safetensors.torch import save_file

        with atomic_output(out / "routing.safetensors") as tmp:
            save_file(routing, str(tmp))
    if job.save_adapter and info["adapter"] is not None:
        from ..adapters import export_adapters

        # every adapter tensor, frozen ones included (mode z freezes the modules), never the backbone
        params = [
            p
            for layer in adapter_layers(net).values()
            for n, p in layer.named_parameters()
            if not n.startswith("base.")
        ] + tables
        with gather(params) if gather else contextlib.nullcontext():
            if main_rank:
                export_adapters(net, out / "adapter", [job.task], extra={"adapted_from": job.export, "mode": job.mode})
    return bool(routing)


def complete_result(
    job: AdaptJob, trainer: str, world: int, k: int, info: dict, evals: Evaluations, losses: dict, routing: bool
) -> dict:
    final, best = evals.entries[-1], evals.best
    return {
        "format": RESULT_FORMAT,
        "status": "complete",
        "job": job.to_dict(),
        "trainer": trainer,
        "world_size": world,
        "label": info["label"],
        "method": info["method"],
        "adapter": info["adapter"],
        "mode": job.mode,
        "task": job.task,
        "seed": job.seed,
        "k": k,
        "zero_shot": k == 0,
        "evaluations": evals.entries,
        "final": {"step": final["step"], "accuracy": final["accuracy"]},
        "best": {"step": best["step"], "accuracy": best["accuracy"]},
        "per_template": final["per_template"],
        "params": {
            "trainable": info["trainable_params"],
            "multi_task": info["multi_task_params"],
            "backbone": info["backbone_params"],
        },
        "backbone": {"model": job.model, "init_seed": info["backbone_seed"]},
        "train_loss": losses["train_loss"],
        "multitask_loss": losses["multitask_loss"],
        "routing_file": "routing.safetensors" if routing else None,
        "finished": time.time(),
    }


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)
