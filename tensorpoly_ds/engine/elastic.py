"""Elastic resume: continue from a checkpoint written on another number of ranks.

ZeRO-1/2/3 checkpoints hold the optimizer state (ZeRO-3 also the parameters) as one flat shard per rank
that wrote it, so they load only on that many ranks. DeepSpeed's universal checkpoint
(deepspeed.checkpoint.ds_to_universal) rewrites the shards as one file per parameter and state
(`zero/<param name>/{fp32,exp_avg,exp_avg_sq,step}.pt`) that every rank of any world size slices its own part
from when the engine's `checkpoint.load_universal` is set. The conversion runs once, on rank 0, into the
tag's sibling `step_NNNNNNNN_universal/` (written in a temporary folder, given its own completion marker with
checksums, then renamed), and is reused by later resumes; the other ranks wait in a collective.

Checkpoints without `*optim_states.pt` files (ZeRO-0: the whole optimizer state is in the single
`mp_rank_00_model_states.pt`) do not depend on the world size and load as they are.

What the conversion needs of our checkpoints: the model states hold the trained tensors only (frozen
parameters are excluded); the converter takes every parameter from the optimizer shards, which hold exactly
the trained ones, and the universal load restores the module from them (frozen parameters are rebuilt from
the model config, as on every resume). Limits, refused before anything is loaded: Adafactor (DeepSpeed's
converter and universal load read AdamW's exp_avg/exp_avg_sq only), and a global batch (micro x accum x ranks)
that differs from the checkpoint's.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpds_common.log import add_logging_arguments, get_logger, setup_from_args

from . import checkpoint as ckpt
from . import distributed as dist

log = get_logger("tensorpoly-ds")

SUFFIX = ckpt.UNIVERSAL_SUFFIX


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + SUFFIX)


def sharded(tag_dir: Path) -> bool:
    """True if the optimizer state is split over the ranks that wrote the tag (ZeRO-1/2/3, bf16 ZeRO-1)."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def needs_conversion(meta: dict[str, Any], tag_dir: Path, world: int) -> bool:
    return int(meta.get("world_size", world)) != world and sharded(tag_dir)


def batch_layout(micro: int, accum: int, world: int) -> dict[str, int]:
    """What a checkpoint records of its batch (meta.json "batch")."""
    return {"micro_batch": micro, "grad_accum": accum, "world_size": world, "global_batch": micro * accum * world}


def _describe(b: dict[str, Any]) -> str:
    return (
        f"{b['global_batch']} (micro {b['micro_batch']} x accum {b['grad_accum']} x {b['world_size']} "
        f"rank{'s' if b['world_size'] != 1 else ''})"
    )


def check(meta: dict[str, Any], tag_dir: Path, *, world: int, batch: dict[str, int] | None, optimizer: str) -> None:
    """Refuse a resume that cannot continue the run: another global batch (the data position, the learning
    rate per sample and the schedule are per global step; `batch` None: not checked, e.g. an export alone),
    or Adafactor state sharded over another world size."""
    saved = meta.get("batch")
    if saved and batch and int(saved["global_batch"]) != batch["global_batch"]:
        need = saved["global_batch"] // world if saved["global_batch"] % world == 0 else None
        hint = (
            f"on {world} rank(s) set train.micro_batch x train.grad_accum = {need}"
            if need
            else f"{saved['global_batch']} is not divisible by {world} ranks: use a world size that divides it"
        )
        raise ckpt.CheckpointError(
            f"{tag_dir}: the checkpoint was trained with a global batch of {_describe(saved)}, this run has "
            f"{_describe(batch)}; the global batch must stay the same across a resume: {hint}"
        )
    saved_world = int(meta.get("world_size", world))
    if saved_world != world and optimizer == "adafactor" and sharded(tag_dir):
        raise ckpt.CheckpointError(
            f"{tag_dir}: written on {saved_world} rank(s), this run has {world}: resuming a sharded ZeRO "
            "checkpoint on another world size converts it to a DeepSpeed universal checkpoint, and DeepSpeed's "
            "converter and universal load know AdamW's states only (exp_avg, exp_avg_sq), not Adafactor's (no first "
            f"moment, an RMS per shard). Resume on {saved_world} rank(s), "
            f"train with optim.name=adamw, or export on {saved_world} rank(s) (--export-only) and start a new run "
            "from the export"
        )


def precheck(tag_dir: Path | None, *, world: int, batch: dict[str, int] | None, optimizer: str) -> None:
    """Cheap, before any process group: `check` on the tag a resume would start from (if it has a meta)."""
    if tag_dir is None or not (tag_dir / ckpt.META).is_file():
        return
    try:
        meta = ckpt.read_meta(tag_dir)
    except (OSError, ValueError):
        return  # the collective verification names the problem
    check(meta, tag_dir, world=world, batch=batch, optimizer=optimizer)


def candidate(ckpt_dir: Path, resume: str) -> Path | None:
    """The tag `--resume` would start from, judged by structure alone (for `precheck`)."""
    if resume in ("none", "", None):
        return None
    if resume != "auto":
        return Path(resume)
    for _, tag_dir in reversed(ckpt.list_tags(ckpt_dir)):
        if ckpt.check_structure(tag_dir) is None:
            return tag_dir
    return None


def _convert(tag_dir: Path, tmp_root: Path) -> Path:
    """rank 0: ds_to_universal into tmp_root/<name>; returns that folder."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tmp_root / universal_dir(tag_dir).name
    # one worker: no process pool forked from a process that holds a process group; inject_missing_state:
    # our modules carry no universal-checkpoint info (no tensor parallelism to describe)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal(args)
    shutil.copy2(tag_dir / ckpt.META, out / ckpt.META)
    return out


def ensure_universal(tag_dir: Path, step: int) -> Path:
    """Collective. The tag's universal sibling, converted by rank 0 unless an intact one exists."""
    out = universal_dir(tag_dir)
    if out.is_dir() and ckpt.verify_tag(out) is None:
        return out
    tmp_root = tag_dir.with_name(f".{out.name}.tmp")
    error = None
    if dist.rank() == 0:
        log.info(f"converting {tag_dir} to a universal checkpoint (written on another world size)")
        try:
            shutil.rmtree(tmp_root, ignore_errors=True)
            _convert(tag_dir, tmp_root)
        except Exception as err:  # noqa: BLE001 - every rank must leave the collective with the same verdict
            error = f"{type(err).__name__}: {str(err)[:500]}"
    error = dist.broadcast_object(error)
    if error is not None:
        raise ckpt.CheckpointError(f"{tag_dir}: conversion to a universal checkpoint failed ({error})")
    converted = tmp_root / out.name
    ckpt.write_marker(converted, step)  # collective: every rank hashes a share
    if dist.rank() == 0:
        shutil.rmtree(out, ignore_errors=True)  # an unusable earlier conversion
        converted.rename(out)
        shutil.rmtree(tmp_root, ignore_errors=True)  # and ds_to_universal's `latest_universal` in it
    dist.barrier()
    return out


@contextlib.contextmanager
def universal_loading(engine):
    """DeepSpeed reads `checkpoint.load_universal` only inside load_checkpoint (0.19.8), and which tag needs it
    is known only after the tags are verified, so it is switched on for that one load."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def repair_after_universal_load(engine) -> None:
    """Two slips of DeepSpeed 0.19.8's ZeRO-3 universal load with more than one param group (ours: modules and
    routing): it copies the first group's hyper-parameters into every group (routing would run a step at the
    modules' learning rate), and it gives every group's state one shared `step` tensor, which AdamW then
    increments once per group and step (bias corrections drift). Each group gets its own learning rate back
    from the scheduler's state, and its own step counter. Harmless for ZeRO-1/2, which load both per group."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None:
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def new_rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of a rank the checkpoint has no state for (it was written on fewer ranks)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def main(argv: list[str] | None = None) -> int:
    """Convert ahead, on one process (e.g. a large full fine-tune, before a job on another world size):
    python -m tensorpoly_ds.engine.elastic RUN_DIR/checkpoints/step_NNNNNNNN"""
    parser = argparse.ArgumentParser(prog="python -m tensorpoly_ds.engine.elastic", description=main.__doc__)
    parser.add_argument("tag", type=Path, help="a checkpoint tag directory")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    setup_from_args(args)
    tag_dir = args.tag
    try:
        why = ckpt.verify_tag(tag_dir)
        if why is not None:
            raise ckpt.CheckpointError(f"{tag_dir}: {why}")
        if not sharded(tag_dir):
            print(f"{tag_dir}: no sharded optimizer state (ZeRO-0): loads on any world size as it is")
            return 0
        print(ensure_universal(tag_dir, int(ckpt.read_meta(tag_dir)["step"])))
    except ckpt.CheckpointError as err:
        print(f"tensorpoly_ds.engine.elastic: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
