"""Adaptation on the DeepSpeed backend of the training loop (tensorpoly_ds.engine.trainer.Trainer).

The engine owns the optimizer (Adafactor param groups), the schedule, clipping, ZeRO and the ranks; this
module supplies the hooks: a collate function for choice batches, the T-Few loss, the per-example
normaliser and the rank-classification evaluation (called on every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from tpds_common.errors import ConfigError

from ..evaluation import LossWeights, collate_choices, collate_lm, length_keys, tfew_losses
from ..evaluation.rank_classification import ChoiceBatch

_CHOICE_FIELDS = tuple(ChoiceBatch.__dataclass_fields__)


def choice_collate(rows: list[dict]) -> dict[str, Any]:
    """A ChoiceBatch as a flat dict of tensors (the engine moves dict tensors to the device)."""
    b = collate_choices(rows, 0)
    return {name: getattr(b, name) for name in _CHOICE_FIELDS}


def tfew_hook(weights: LossWeights, chunk_tokens: int = 0) -> Callable:
    def loss_fn(model: nn.Module, batch: dict[str, Any]):
        out = tfew_losses(model, ChoiceBatch(**{k: batch[k] for k in _CHOICE_FIELDS}), weights, chunk_tokens)
        n = batch["input_ids"].shape[0]
        # the engine divides the summed loss by the summed weights of the global batch: example mean
        return out["loss"] * n, {k: float(out[k]) for k in ("lm", "mc", "unlikelihood")}

    return loss_fn


def examples(batch: dict[str, Any]) -> float:
    return float(batch["input_ids"].shape[0])


def _sections(job, steps: int, world: int, micro_total: int, eval_every: int):
    from ..engine.config import DeepSpeedSection, OptimSection, TrainSection

    if micro_total % world:
        raise ConfigError(f"batch size {micro_total} is not divisible by the {world} ranks")
    optim = OptimSection(
        name=job.optimizer,
        lr=job.lr,
        module_lr=job.lr,
        routing_lr=job.routing_lr or job.lr,
        warmup_ratio=job.warmup_ratio,
        clip=job.clip,
        schedule="linear",
    )
    # heatmap_max_layers=0: the routing of a one-task job is a single row per layer, which the routing entropy
    # scalars and routing.safetensors already hold; eight matplotlib figures per eval cost more than the eval
    train = TrainSection(
        steps=steps,
        micro_batch=micro_total // world,
        grad_accum=job.grad_accum,
        eval_every=eval_every,
        save_every=0,
        seed=job.seed,
        export_at_end=False,
        eval_at_end=True,
        progress_bar=False,
        keep_checkpoints=1,
        heatmap_max_layers=0,
    )
    ds = DeepSpeedSection(zero_stage=job.zero_stage, precision=job.precision)
    return optim, train, ds


def ds_config_for(job, steps: int, world: int) -> dict:
    """The DeepSpeed config the few-shot run will use (needed before the backbone is built under ZeRO-3)."""
    from ..engine.ds_config import fill_sections

    optim, train, ds = _sections(job, steps, world, job.batch_size, job.eval_every)
    return fill_sections(ds, train, optim, world)


class _Rows:
    """A list of dicts with the indexing the engine's data stream uses (ds[list_of_ints] -> columns)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def length_keys(self):
        """The sort keys of length-grouped batching (engine.data.row_lengths): the local trainer's."""
        return length_keys(self.rows)

    def __getitem__(self, idx):
        if isinstance(idx, int):
            return self.rows[idx]
        picked = [self.rows[i] for i in idx]
        return {c: [r[c] for r in picked] for c in self.column_names}


def engine_train(
    job,
    model: nn.Module,
    out: Path,
    *,
    steps: int,
    train_rows: list[dict],
    weights: LossWeights,
    run_eval: Callable[[nn.Module, int], dict],
    world: int,
    data_dir: str,
    resumed_in: str | None = None,
    eval_at_start: bool = False,
):
    """Returns (network to evaluate / snapshot, gather(params) context factory, history, multitask history,
    stopped): `stopped` is {"phase", "step"} when a stop request ended a phase (the engine checkpointed
    under OUT/engine/<phase>/checkpoints; the job is then "requeue"), else None. `resumed_in` (the phase a
    stopped run ended in) resumes both phases from their checkpoints (a finished phase from its last one)."""
    run_root = out / "engine"
    resume = "auto" if resumed_in is not None else "none"
    net: nn.Module = model
    _prepare_zero3(job, model, steps)
    multitask_history: list[dict] = []
    history: list[dict] = []
    if job.multitask_steps > 0:
        res = _multitask_phase(job, net, world, data_dir, run_root / "multitask", resume)
        multitask_history = res.history
        net = res.engine
        if res.status == "requeue":
            return net, None, history, multitask_history, {"phase": "multitask", "step": res.step}
    if steps == 0 and job.multitask_steps == 0 and job.zero_stage == 3:
        # zero-shot under ZeRO-3: no training, but the (partitioned) model still needs the engine to run
        import deepspeed

        net, *_ = deepspeed.initialize(model=model, config=ds_config_for(job, 1, world))
    if eval_at_start:
        run_eval(net, 0)
    if steps > 0:
        res = _fewshot_phase(
            job,
            getattr(net, "module", net),
            steps,
            world,
            train_rows,
            weights,
            run_eval,
            run_root / "fewshot",
            resume if resumed_in == "fewshot" else "none",
        )
        history = res.history
        net = res.engine
        if res.status == "requeue":
            return net, None, history, multitask_history, {"phase": "fewshot", "step": res.step}
    return net, _gather_for(net), history, multitask_history, None


def _prepare_zero3(job, model: nn.Module, steps: int) -> None:
    """Refuse two phases under ZeRO-3; register shared routing tables with every layer that reads them."""
    from .job import JobError

    if job.zero_stage == 3 and getattr(model, "tpds_routing", None) is not None:
        # prepare_adaptation made fresh routing tables shared by many layers: ZeRO-3 must gather them
        # with every layer that reads them (REFERENCE pitfall 4)
        from ..adapters import register_external_routing_params

        register_external_routing_params(model)
    if job.multitask_steps > 0 and steps > 0 and job.zero_stage == 3:
        raise JobError(
            "multitask_steps and few-shot steps in one job need two DeepSpeed initialisations, "
            "which ZeRO-3 does not allow on one model: use zero_stage <= 2 or split the job"
        )


def _multitask_phase(job, net: nn.Module, world: int, data_dir: str, run_dir: Path, resume: str):
    """Multi-task steps on the variant's training split (token-mean LM loss) before the few shots."""
    from ..engine.trainer import DataOptions, Trainer, TrainHooks
    from .job import load_rows

    mt_rows = _Rows(load_rows(data_dir, "train"))
    optim, tr, ds = _sections(job, job.multitask_steps, world, job.multitask_batch_size, 0)
    optim.lr = optim.module_lr = job.multitask_lr or job.lr
    tr.eval_at_end = False
    hooks = TrainHooks(collate_fn=lambda rows: collate_lm(rows, 0))  # default loss: token-mean LM
    data = DataOptions(batching=job.batching, group_size=job.group_size)
    return Trainer(
        net, mt_rows, optim=optim, train=tr, deepspeed=ds, run_dir=run_dir, tasks=[job.task], hooks=hooks, data=data
    ).run(resume)


def _fewshot_phase(
    job,
    net: nn.Module,
    steps: int,
    world: int,
    train_rows: list[dict],
    weights: LossWeights,
    run_eval: Callable[[nn.Module, int], dict],
    run_dir: Path,
    resume: str,
):
    """The few-shot steps: T-Few loss, example-mean normaliser, the job's evaluation every eval_every steps."""
    from ..engine.trainer import DataOptions, Trainer, TrainHooks

    optim, tr, ds = _sections(job, steps, world, job.batch_size, job.eval_every)
    if len(train_rows) < job.batch_size:
        # the engine's stream needs one global batch per epoch: repeat the few shots (k < batch size)
        train_rows = train_rows * -(-job.batch_size // len(train_rows))
    hooks = TrainHooks(
        loss_fn=tfew_hook(weights, job.chunk_tokens),
        weight_fn=examples,
        collate_fn=choice_collate,
        eval_fn=lambda engine, step: run_eval(engine, step),
    )
    data = DataOptions(batching=job.batching, group_size=job.group_size)
    return Trainer(
        net,
        _Rows(train_rows),
        optim=optim,
        train=tr,
        deepspeed=ds,
        run_dir=run_dir,
        tasks=[job.task],
        hooks=hooks,
        data=data,
    ).run(resume)


def _gather_for(net) -> Callable | None:
    """Under ZeRO-3 a context factory that gathers partitioned parameters (snapshots, exports); else None."""
    from ..engine import trainer as eng

    if hasattr(net, "zero_optimization_partition_weights"):

        def gather(params):
            return eng.gathered(net, params)

        return gather
    return None
