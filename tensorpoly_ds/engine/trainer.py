"""The DeepSpeed backend of the training loop (engine.loop) and the reusable API other stages call.

    from tensorpoly_ds.engine.trainer import DataOptions, Trainer, TrainHooks

    result = Trainer(model, train_rows, optim=cfg.optim, train=cfg.train, deepspeed=cfg.deepspeed,
                     run_dir="runs/x", tasks=task_names, val_rows=val_rows, data=DataOptions.of(cfg.data, eos_id),
                     hooks=TrainHooks(loss_fn=..., eval_fn=...)).run(resume="none")
    result.status   # "done" | "requeue" (signal or time budget: a checkpoint was written, exit with 124)
    result.engine   # the DeepSpeed engine; result.model is engine.module

Objective. For every optimizer step the engine minimises  sum(loss_sum over the global batch) /
sum(weight over the global batch): the default loss_sum is the summed token NLL and the weight the number
of target tokens, i.e. the token-mean over the global batch. The weights are all-reduced before the
forward passes, each micro-batch's backward gets loss_sum * world * accum / global_weight (DeepSpeed
divides by accum and averages over ranks), so gradients do not depend on how the global batch is split
over ranks or micro-steps. With length-grouped batching and the default weight, global_weight is the
split's mean target-token count per step instead (a constant), so that every token weighs the same whatever
the length of the rows it shares a step with.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorpoly_ds.adapters import (
    adapter_layers,
    adapter_param_groups,
    health,
    routing_tables,
    set_factor_recomputation,
    task_routing,
)
from tensorpoly_ds.adapters.export import config_differences
from tpds_common.log import get_logger, progress

from . import checkpoint as ckpt
from . import distributed as dist
from . import elastic
from .checkpoint import seed_all
from .config import DataSection, DeepSpeedSection, OptimSection, RunConfigError, TrainSection
from .data import IGNORE_INDEX, TrainStream, collate, eval_batches
from .ds_config import fill_sections, save_json
from .effective import ActivationDtype, describe_engine
from .loop import GRAD_NORM, TRAIN_LOSS, TrainLoop, lr_factor, lr_key, train_key
from .monitor import Monitor, memory_mb, routing_weights
from .stop import REQUEUE_EXIT_CODE, STOP, StopFlag  # noqa: F401  (re-exported)

log = get_logger("tensorpoly-ds")


# ---- hooks -----------------------------------------------------------------------------------------------
def _module(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def lm_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed token NLL of the targets (labels -100 ignored). Called inside task_routing(batch task ids)."""
    labels = batch["labels"]
    dec_in = _module(model).prepare_decoder_input_ids_from_labels(labels=labels)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec_in, use_cache=False
    )
    logits = out.logits.float()
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, {}


def token_weight(batch: dict[str, Any]) -> float:
    return float((batch["labels"] != IGNORE_INDEX).sum())


@dataclass
class TrainHooks:
    """loss_fn(model, batch) -> (loss_sum tensor, extra stats {name: float}); runs inside task_routing.
    weight_fn(batch) -> float: the batch's share of the normaliser (default: target tokens); must not need
    the forward pass. eval_fn(engine, step) -> {name: float}: called on EVERY rank every eval_every steps
    and at the end (ZeRO-3: run the same number of forward passes on every rank), rank 0 logs the result.
    collate_fn(rows) -> batch overrides the default padding (rows are dicts of the dataset's columns).
    on_step(step, metrics) on every rank after each optimizer step."""

    loss_fn: Callable = lm_loss
    weight_fn: Callable = token_weight
    eval_fn: Callable | None = None
    collate_fn: Callable | None = None
    on_step: Callable | None = None


@dataclass
class TrainResult:
    status: str  # "done" or "requeue"
    step: int
    engine: Any
    run_dir: Path
    history: list[dict] = field(default_factory=list)  # this process's per-step metrics
    export_dir: Path | None = None

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "done" else REQUEUE_EXIT_CODE


# ---- optimizer and schedule -------------------------------------------------------------------------------
def param_groups(model: nn.Module, optim: OptimSection) -> list[dict[str, Any]]:
    """Adapters: {"modules": module_lr, "routing": routing_lr}; no adapters (full fine-tune): {"base": lr}.
    Only trainable parameters; empty groups dropped."""
    if getattr(model, "tpds_adapter_config", None) is not None:
        groups = adapter_param_groups(model)
        spec = [("modules", groups["modules"], optim.module_lr), ("routing", groups["routing"], optim.routing_lr)]
    else:
        spec = [("base", [p for p in model.parameters() if p.requires_grad], optim.lr)]
    out = [{"params": ps, "lr": lr, "name": name, "weight_decay": optim.weight_decay} for name, ps, lr in spec if ps]
    if not out:
        raise RunConfigError("no trainable parameters")
    return out


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSection) -> torch.optim.Optimizer:
    if optim.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=groups[0]["lr"],
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=optim.weight_decay,
        )
    return torch.optim.AdamW(
        groups, lr=groups[0]["lr"], betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )


# ---- helpers ---------------------------------------------------------------------------------------------
def _zero3(engine) -> bool:
    return engine.zero_optimization_partition_weights()


def gathered(engine, params) -> contextlib.AbstractContextManager:
    """Collective under ZeRO-3 (every rank must enter): full tensors visible inside."""
    if not _zero3(engine):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate_loss(
    engine,
    val_rows,
    *,
    batch_size: int,
    device,
    hooks: TrainHooks,
    max_rows=None,
    max_input_len=None,
    max_target_len=None,
    eos_id=1,
) -> float:
    """Token-mean validation loss over all of val_rows (all ranks, same number of forward passes)."""
    engine.eval()
    total = [0.0, 0.0]
    with torch.no_grad():
        for batch in eval_batches(
            val_rows,
            batch_size=batch_size,
            rank=dist.rank(),
            world_size=dist.world_size(),
            max_rows=max_rows,
            max_input_len=max_input_len,
            max_target_len=max_target_len,
            eos_id=eos_id,
        ):
            batch = _to(batch, device)
            with task_routing(batch["task_ids"]):
                loss_sum, _ = hooks.loss_fn(engine, batch)
            total[0] += float(loss_sum)
            total[1] += hooks.weight_fn(batch)
    engine.train()
    s, w = dist.all_reduce_sum(total, device)
    return s / w if w > 0 else float("nan")


def export_trained(engine, out_dir: Path, tasks: list[str], extra: dict | None = None) -> Path:
    """Collective. Adapters: tensorpoly_ds.adapters.export_adapters (safetensors + adapter JSON with the
    task registry); full fine-tune: save_pretrained (safetensors). Gathered on every rank under ZeRO-3,
    written by rank 0 only; independent of world size and ZeRO stage."""
    from tensorpoly_ds.adapters import adapter_parameters, export_adapters

    module = engine.module
    out_dir = Path(out_dir)
    has_adapters = getattr(module, "tpds_adapter_config", None) is not None
    params = adapter_parameters(module) if has_adapters else list(module.parameters())
    with gathered(engine, params):
        if dist.rank() == 0:
            if has_adapters:
                export_adapters(module, out_dir, tasks, extra=extra)
            else:
                tmp = out_dir.with_name(out_dir.name + ".tmp")
                module.save_pretrained(
                    str(tmp),
                    safe_serialization=True,
                    state_dict={k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                )
                (tmp / "tasks.json").write_text(json.dumps({"tasks": tasks, **(extra or {})}, indent=2))
                if out_dir.exists():
                    import shutil

                    shutil.rmtree(out_dir)
                tmp.rename(out_dir)
    dist.barrier()
    return out_dir


def _tokens(batch: dict[str, Any]) -> float:
    """Input plus target tokens of a batch (for tokens/s), whatever the collate function produced."""
    n = 0.0
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        n += float(mask.sum())
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        n += float((labels != IGNORE_INDEX).sum())
    return n


# ---- the loop -----------------------------------------------------------------------------------------
@dataclass
class DataOptions:
    """How rows become batches: lengths, end-of-sequence id, evaluation batch and rows, and which rows share a
    step (`batching`, `group_size`: data.TrainStream)."""

    max_input_len: int | None = None
    max_target_len: int | None = None
    eos_id: int = 1
    eval_micro_batch: int | None = None
    val_max_samples: int | None = None
    batching: str = "random"
    group_size: int = 4

    @classmethod
    def of(cls, section: DataSection, eos_id: int) -> DataOptions:
        """A run config's data section (everything but its `dir`) and the tokenizer's end-of-sequence id."""
        return cls(
            max_input_len=section.max_input_len,
            max_target_len=section.max_target_len,
            eos_id=eos_id,
            eval_micro_batch=section.eval_micro_batch,
            val_max_samples=section.val_max_samples,
            batching=section.batching,
            group_size=section.group_size,
        )


class Trainer(TrainLoop):
    """The DeepSpeed backend of the training loop (engine.loop): setup, resume, step, evaluate, checkpoint,
    export. `Trainer(...).run(resume)` trains `model` (adapters injected and frozen backbone, or everything
    trainable) on `train_rows` (a datasets.Dataset or anything indexable by a list of ints returning a dict of
    columns, with at least task_id, input_ids, target_ids); every rank must call it. The process group must
    exist (distributed.init_distributed()) or the run is a single process. `data` (DataOptions): lengths, eos
    id, evaluation batch and rows, which rows share a step. `resume`: "none", "auto" (the newest intact
    checkpoint under RUN_DIR/checkpoints; none at all: a fresh start; some, but none usable: CheckpointError)
    or a tag directory (checkpoint.resume). The order of the calls below is the order of the RNG draws and
    collectives, so a run gives the same numbers whatever calls it."""

    def __init__(
        self,
        model: nn.Module,
        train_rows,
        *,
        optim: OptimSection,
        train: TrainSection,
        deepspeed: DeepSpeedSection,
        run_dir: str | Path,
        tasks: list[str] | None = None,
        val_rows=None,
        hooks: TrainHooks | None = None,
        data: DataOptions | None = None,
        ds_config: dict | None = None,
        fingerprint: dict | None = None,
        export_dir: str | Path | None = None,
        export_extra: dict | None = None,
    ):
        self.model, self.train_rows, self.val_rows, self.tasks = model, train_rows, val_rows, tasks
        self.optim, self.cfg, self.ds_section = optim, train, deepspeed
        self.run_dir = Path(run_dir)
        self.hooks = hooks or TrainHooks()
        self.data = data or DataOptions()
        self.ds_config, self.fingerprint = ds_config, fingerprint or {}
        self.export_dir, self.export_extra, self.export_path = export_dir, export_extra, None
        self.step_no, self.history, self.eval_pending = 0, [], False

    @property
    def total_steps(self) -> int:
        return self.cfg.steps

    # -- setup and resume ------------------------------------------------------------------------------------
    def run(self, resume: str = "none") -> TrainResult:
        self.setup()
        self.resume(resume)
        self.open_outputs()
        try:
            status = self.loop()
        finally:
            self.close()
        return TrainResult(status, self.step_no, self.engine, self.run_dir, self.history, self.export_path)

    def setup(self) -> None:
        """Process group, DeepSpeed engine (optimizer param groups, schedule), per-rank RNG streams, data."""
        if not dist.is_dist():
            dist.init_distributed()
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = dist.device_and_backend()[0]
        self.ds_config = self.ds_config or fill_sections(self.ds_section, self.cfg, self.optim, self.world)
        if self.rank == 0:
            save_json(self.ds_config, self.run_dir / "ds_config.json")
        adapter_cfg = getattr(_module(self.model), "tpds_adapter_config", None)
        self.meta_base = {
            "fingerprint": self.fingerprint.get("hash"),
            "adapter": adapter_cfg.to_dict() if adapter_cfg else None,
            "full_finetune": adapter_cfg is None,
            "world_size": self.world,
            "tasks": self.tasks,
            "batch": elastic.batch_layout(self.cfg.micro_batch, self.cfg.grad_accum, self.world),
        }
        self._build_engine(adapter_cfg)
        seed_all(self.cfg.seed + 1000 * self.rank)  # per-rank streams (dropout, Gumbel noise); restored on resume
        self._build_stream()
        self.ckpt_dir = self.run_dir / "checkpoints"

    def _build_engine(self, adapter_cfg) -> None:
        import deepspeed as ds_lib

        tr, optim, d = self.cfg, self.optim, self.data
        if tr.gradient_checkpointing:
            from .model import enable_gradient_checkpointing

            enable_gradient_checkpointing(self.model)
        set_factor_recomputation(self.model, tr.recompute_adapter_factors)
        groups = param_groups(self.model, optim)
        self.group_names = [g["name"] for g in groups]
        self.probe = _grad_alignment_probe(
            tr,
            self.ds_config,
            adapter_cfg,
            self.train_rows,
            self.tasks or [],
            self.hooks,
            self.rank,
            d.max_input_len,
            d.max_target_len,
            d.eos_id,
        )
        self.optimizer = build_optimizer(groups, optim)

        def make_scheduler(opt):  # reads tr.steps when stepped (an export-only run sets it to 0)
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, tr.steps, optim.warmup_ratio, optim.schedule)
            )

        self.engine, _, _, _ = ds_lib.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=make_scheduler, config=self.ds_config
        )
        self.engine.train()
        self.activation_dtype = ActivationDtype(self.engine.module)

    def _build_stream(self) -> None:
        tr, d, hooks = self.cfg, self.data, self.hooks
        self.stream = TrainStream(
            self.train_rows,
            seed=tr.seed,
            micro_batch=tr.micro_batch,
            grad_accum=tr.grad_accum,
            rank=self.rank,
            world_size=self.world,
            max_input_len=d.max_input_len,
            max_target_len=d.max_target_len,
            eos_id=d.eos_id,
            collate_fn=hooks.collate_fn,
            batching=d.batching,
            group_size=d.group_size,
        )
        # Length-grouped steps hold rows of similar length, so their target-token counts differ far more than
        # random steps' do; dividing each step by its own count would weight a token by 1/(its step's count) and
        # favour tasks with short targets. Dividing by the split's mean count per step weights every token alike.
        self.fixed_norm = (
            self.stream.mean_step_targets()
            if d.batching == "length_grouped" and hooks.weight_fn is token_weight and hooks.collate_fn is None
            else None
        )

    def resume(self, mode: str) -> None:
        meta = ckpt.resume(self.engine, self.ckpt_dir, mode, check=self._check_resumable, rng_seed=self.cfg.seed)
        if meta is None:
            return
        self.step_no = int(meta["step"])
        self.stream.load_state_dict(meta["data"])
        # a stop at an evaluation step checkpointed before evaluating: evaluate first, as the
        # uninterrupted run did at this step
        self.eval_pending = bool(meta.get("eval_pending"))
        if self.rank == 0:
            log.info(
                f"resumed from {meta['tag']} at step {self.step_no} on {self.world} rank(s)"
                + _written_on(meta, self.world)
            )

    def _check_resumable(self, saved: dict, tag: Path) -> None:
        _check_compatible(saved, self.meta_base, tag)
        more_steps = self.cfg.steps > int(saved.get("step", 0))  # an export alone does not care about the batch
        elastic.check(
            saved,
            tag,
            world=self.world,
            batch=self.meta_base["batch"] if more_steps else None,
            optimizer=self.optim.name,
        )

    def open_outputs(self) -> None:
        """Monitor, stop flag, progress bar and the per-step probes; `close` undoes them."""
        tr = self.cfg
        self.monitor = Monitor(self.run_dir, enabled=self.rank == 0)
        self.stop = STOP
        self.installed_here = self.stop.install()  # launchers install it at start-up; library callers get it here
        self.start_time = time.monotonic()
        self.bar = None
        if self.rank == 0 and tr.progress_bar:
            self.bar = progress(total=tr.steps, initial=self.step_no, desc="train", dynamic_ncols=True, rank=self.rank)
        self.manual_norm = self.ds_config["zero_optimization"]["stage"] == 0 and not self.ds_config.get("bf16", {}).get(
            "enabled"
        )
        self.trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.probe_health = AdapterHealth.build(self.engine.module, tr.adapter_health, self.rank, self.device)

    def close(self) -> None:
        if self.installed_here:
            self.stop.restore()
        if self.bar is not None:
            self.bar.close()
        self.monitor.close()

    # -- the step --------------------------------------------------------------------------------------------
    def before_steps(self) -> None:
        self.last_saved = self.step_no if self.step_no > 0 else -1
        if self.eval_pending and self.eval_due(self.step_no):
            self.evaluate(self.step_no)

    def step(self) -> dict[str, float]:
        """One optimizer step over the global batch; one collective for the weights, one for the loss and
        the stop vote."""
        t0 = time.perf_counter()
        device = self.device
        lrs = {lr_key(name): group["lr"] for name, group in zip(self.group_names, self.optimizer.param_groups)}
        micro_batches = [_to(b, device) for b in self.stream.next_step()]
        local_w = sum(self.hooks.weight_fn(b) for b in micro_batches)
        local_tok = sum(_tokens(b) for b in micro_batches)
        global_w, global_tok = dist.all_reduce_sum([local_w, local_tok], device)
        norm = self.fixed_norm or global_w
        scale = self.world * self.cfg.grad_accum / norm if norm > 0 else 0.0
        loss_total, extra, grad_norm = self._forward_backward(micro_batches, scale)
        self.step_no += 1
        self._describe_engine_once()
        if grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        over_budget = self.cfg.max_minutes > 0 and (time.monotonic() - self.start_time) > 60 * self.cfg.max_minutes
        loss_all, self.stop_votes = dist.all_reduce_sum(
            [loss_total, float(self.stop.signal is not None or over_budget)], device
        )
        dt = time.perf_counter() - t0
        metrics = {
            TRAIN_LOSS: loss_all / global_w if global_w > 0 else float("nan"),
            GRAD_NORM: grad_norm,
            "perf/step_time_s": dt,
            "perf/samples_per_s": self.stream.global_batch / dt,
            "perf/tokens_per_s": global_tok / dt,
        }
        if self.probe_health is not None:
            metrics.update(self.probe_health.metrics())
        metrics.update(lrs)  # the learning rates this step used
        metrics.update(memory_mb(device))
        metrics.update({train_key(k): v for k, v in extra.items()})
        return metrics

    def _forward_backward(self, micro_batches: list[dict], scale: float) -> tuple[float, dict, float | None]:
        """Forward and backward of each micro-batch, engine.step after each (DeepSpeed updates at the last).
        Returns (summed loss, summed extra stats, grad norm measured here under ZeRO-0 fp32 or None)."""
        engine, last = self.engine, len(micro_batches) - 1
        loss_total, extra = 0.0, {}
        grad_norm = None
        for i, batch in enumerate(micro_batches):
            with task_routing(batch["task_ids"]), health.recording(self.probe_health is not None):
                loss_sum, stats = self.hooks.loss_fn(engine, batch)
            engine.backward(loss_sum * scale)
            if self.manual_norm and i == last and self.trainable:
                grads = [p.grad.detach().float().norm() for p in self.trainable if p.grad is not None]
                grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
            if self.probe_health is not None and i == last:
                self.probe_health.read_grads()
            engine.step()
            loss_total += float(loss_sum.detach())
            for k, v in (stats or {}).items():
                extra[k] = extra.get(k, 0.0) + float(v)
        return loss_total, extra, grad_norm

    def _describe_engine_once(self) -> None:
        """engine.json after the first step, when the optimizer state exists."""
        if self.activation_dtype is None:
            return
        if self.rank == 0:
            save_json(describe_engine(self.engine, self.activation_dtype.dtype), self.run_dir / "engine.json")
        self.activation_dtype.remove()
        self.activation_dtype = None

    def record(self, metrics: dict[str, float]) -> None:
        step = self.step_no
        self.history.append({"step": step, **metrics})
        if self.hooks.on_step is not None:
            self.hooks.on_step(step, metrics)
        if self.rank == 0:
            if step % self.cfg.log_every == 0 or step == 1 or step == self.cfg.steps:
                self.monitor.scalars(step, metrics)
            else:  # metrics.jsonl gets every step (trajectory comparisons); TensorBoard every log_every
                self.monitor.jsonl.write(json.dumps({"kind": "train", "step": step, **metrics}) + "\n")
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{metrics[TRAIN_LOSS]:.4f}", refresh=False)
        if self.probe is not None and step % self.cfg.grad_alignment_every == 0:
            matrix, seconds = self.probe.measure(self.engine.module, self.device)
            self.monitor.grad_alignment(step, self.probe.task_names, matrix, seconds)
        if not math.isfinite(metrics[TRAIN_LOSS]):
            warnings.warn(f"step {step}: non-finite training loss {metrics[TRAIN_LOSS]}", RuntimeWarning, stacklevel=2)

    def stop_requested(self) -> bool:
        return self.stop_votes > 0

    def on_stop(self) -> None:
        if self.rank == 0:
            why = "time budget" if self.stop.signal is None else self.stop.name
            log.info(f"stop requested ({why}) at step {self.step_no}: checkpointing, exit {REQUEUE_EXIT_CODE}")
        self.checkpoint(self.step_no, eval_pending=self.eval_due(self.step_no))

    def after_step(self) -> None:
        step, tr = self.step_no, self.cfg
        if self.eval_due(step):
            self.evaluate(step)
        if tr.save_every and step % tr.save_every == 0 and step < tr.steps:
            self.checkpoint(step)

    def finish(self) -> None:
        if self.last_saved != self.step_no:
            self.checkpoint(self.step_no)
        if self.cfg.eval_at_end:
            self.evaluate(self.step_no)
        if self.cfg.export_at_end:
            self.export_path = self.export()

    # -- evaluation, checkpoints, export ---------------------------------------------------------------------
    def eval_due(self, at_step: int) -> bool:
        tr = self.cfg
        return bool(tr.eval_every) and at_step % tr.eval_every == 0 and at_step < tr.steps

    def evaluate(self, at_step: int) -> None:
        """Validation loss, the eval hook and the routing figures (every rank; rank 0 logs)."""
        metrics = {}
        if self.val_rows is not None:
            d = self.data
            metrics["val/loss"] = evaluate_loss(
                self.engine,
                self.val_rows,
                batch_size=d.eval_micro_batch or 2 * self.cfg.micro_batch,
                device=self.device,
                hooks=self.hooks,
                max_rows=d.val_max_samples,
                max_input_len=d.max_input_len,
                max_target_len=d.max_target_len,
                eos_id=d.eos_id,
            )
        if self.hooks.eval_fn is not None:
            metrics.update(self.hooks.eval_fn(self.engine, at_step) or {})
        tables = routing_tables(self.engine.module)
        if tables:
            with gathered(self.engine, [t.logits for t in tables.values()]):
                weights = routing_weights(tables)
            self.monitor.routing(at_step, weights, self.tasks or [], self.cfg.heatmap_max_layers)
        if metrics:
            self.monitor.scalars(at_step, metrics, kind="eval")
            if self.bar is not None:
                log.info(f"step {at_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.monitor.flush()

    def checkpoint(self, at_step: int, eval_pending: bool = False) -> Path | None:
        self.last_saved = at_step
        if not self.cfg.save_checkpoints:
            return None
        meta = dict(
            self.meta_base, step=at_step, data=self.stream.state_dict(), time=time.time(), eval_pending=eval_pending
        )
        return ckpt.save(self.engine, self.ckpt_dir, at_step, meta, keep=self.cfg.keep_checkpoints)

    def export(self) -> Path:
        return export_trained(
            self.engine,
            Path(self.export_dir or self.run_dir / "export"),
            self.tasks or [],
            extra={"step": self.step_no, **(self.export_extra or {})},
        )


@dataclass
class AdapterHealth:
    """train.adapter_health: the adapters' output ratios recorded in the step's forward passes and their
    gradient norms read before the optimizer step, all-reduced in one collective (every rank logs the global
    value; rank 0 writes it)."""

    layers: dict
    groups: dict
    rank: int
    device: Any
    grads: torch.Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, enabled: bool, rank: int, device) -> AdapterHealth | None:
        if not enabled or getattr(model, "tpds_adapter_config", None) is None:
            return None
        groups = {k: v for k, v in adapter_param_groups(model).items() if v}
        return cls(adapter_layers(model), groups, rank, device)

    def read_grads(self) -> None:
        self.grads = health.grad_square_sums(self.groups, self.rank, self.device)

    def metrics(self) -> dict[str, float]:
        sums = health.take_sums(self.layers)
        grads, self.grads = self.grads, None
        if sums is None or grads is None:
            return {}
        flat = torch.cat([sums.to(self.device, torch.float64).flatten(), grads])
        if dist.is_dist():
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat = flat.cpu()
        n = sums.numel()
        return {
            **health.ratio_metrics(list(self.layers), flat[:n].view(-1, 2)),
            **health.grad_metrics(list(self.groups), flat[n:]),
        }


def _grad_alignment_probe(
    train: TrainSection,
    ds_config: dict,
    adapter_cfg,
    train_rows,
    tasks: list[str],
    hooks: TrainHooks,
    rank: int,
    max_input_len,
    max_target_len,
    eos_id,
):
    """The gradient-alignment probe on rank 0 (None when off or on other ranks). Built on every rank, so that
    an unsupported setup or an unknown task fails everywhere before DeepSpeed starts (not rank 0 alone)."""
    if not train.grad_alignment_every:
        return None
    from .grad_alignment import GradAlignmentProbe, unsupported

    why = unsupported(ds_config["zero_optimization"]["stage"], has_adapter=adapter_cfg is not None)
    if why:
        raise RunConfigError(f"train.grad_alignment_every = {train.grad_alignment_every}: {why}")
    batch_of = hooks.collate_fn or (lambda rows: collate(rows, max_input_len, max_target_len, eos_id))
    probe = GradAlignmentProbe.build(
        train_rows,
        tasks,
        train.grad_alignment_tasks,
        train.grad_alignment_rows,
        batch_of,
        hooks.loss_fn,
        hooks.weight_fn,
    )
    return probe if rank == 0 else None


def _written_on(meta: dict, world: int) -> str:
    saved = int(meta.get("world_size", world))
    if saved == world:
        return ""
    if meta.get("universal"):
        return f" (checkpoint written on {saved} rank(s), converted to a universal checkpoint at {meta['universal']})"
    return f" (checkpoint written on {saved} rank(s); its optimizer state is not sharded, loaded as it is)"


def _check_compatible(meta: dict, current: dict, tag_dir: Path) -> None:
    """Refuse a checkpoint from another adapter config (naming the differing fields) or training mode."""
    from tensorpoly_ds.adapters import AdapterConfig

    if bool(meta.get("full_finetune")) != bool(current["full_finetune"]):
        raise ckpt.CheckpointError(
            f"{tag_dir}: checkpoint full_finetune={meta.get('full_finetune')}, this run "
            f"full_finetune={current['full_finetune']}"
        )
    if meta.get("adapter") is not None and current["adapter"] is not None:
        diff = config_differences(AdapterConfig.from_dict(meta["adapter"]), AdapterConfig.from_dict(current["adapter"]))
        if diff:
            raise ckpt.CheckpointError(
                f"{tag_dir}: checkpoint was trained with a different adapter config "
                f"(checkpoint vs this run): {'; '.join(diff)}"
            )
    if meta.get("fingerprint") and current.get("fingerprint") and meta["fingerprint"] != current["fingerprint"]:
        raise ckpt.CheckpointError(
            f"{tag_dir}: config fingerprint {meta['fingerprint']} differs from this run's "
            f"{current['fingerprint']} (model, optimizer or data changed)"
        )
