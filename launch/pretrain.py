"""Stage 2: multi-task pretraining on DeepSpeed.

    tensorpoly-ds pretrain --config configs/pretrain/base_t0_3b.yaml --config configs/pretrain/poly.yaml \
        data.dir=/data/p3 run.dir=runs/poly [--resume auto]

Runs under `deepspeed`, `torchrun`, `srun` or plain `python` (one process). Exit status (tpds_common.errors):
0 done, 1 a bug (a traceback), 2 bad config, arguments or data (nothing started) or no usable checkpoint,
124 stopped by SIGUSR1/SIGTERM/SIGINT or the time budget after writing a checkpoint ("requeue me": rerun the
same command with --resume auto), 75 another live run holds run.dir. Each rank records its exit reason in
RUN_DIR/status/rank<r>.json; torchrun turns a rank's 124 into its own exit 1, so under torchrun use
`python -m launch.torchrun` (same arguments), which maps "every rank says requeue" back to 124.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/pretrain.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpds_common.errors import EXIT_FAILED, CheckpointError, UserError, report_user_errors  # noqa: E402

PROG = "tensorpoly-ds pretrain"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from tpds_common.log import add_logging_arguments

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        action="append",
        default=[],
        required=True,
        help="YAML run config; repeat to compose (later wins, nested merge)",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (default): the newest intact checkpoint of run.dir, a fresh start if there are none, "
        "an error if there are some but none is usable; none: start afresh; or a tag directory",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="load the newest checkpoint and write the adapter export, without training",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    add_logging_arguments(p)
    return p.parse_args(argv)


def backbone_record(cfg, vocab_size: int) -> dict:
    """What adaptation needs to rebuild the same backbone: a backbone built from an architecture name is
    random, so its init seed (train.seed, set on every rank before the build) is part of its identity."""
    return {
        "name_or_path": cfg.model.name_or_path,
        "vocab_size": cfg.model.vocab_size or vocab_size,
        "arch_overrides": dict(cfg.model.arch_overrides),
        "init_seed": cfg.train.seed,
        "precision": cfg.deepspeed.precision,
    }


def main(argv: list[str] | None = None) -> int:
    from tensorpoly_ds.engine.allocator import configure_malloc
    from tensorpoly_ds.engine.stop import STOP

    configure_malloc()  # before the backbone's allocations (host memory at T0-3B: docs/pretrain.md)
    with STOP.handling():  # before anything slow: a SIGUSR1 during start-up must not kill the rank
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from tensorpoly_ds.engine.job_env import stop_with_parent

    stop_with_parent()  # a run of a pool (replicate, lr-search): a killed pool leaves no orphan
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from tpds_common.log import setup_from_args

    setup_from_args(args)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from tensorpoly_ds.engine import checkpoint as ckpt
    from tensorpoly_ds.engine import elastic
    from tensorpoly_ds.engine.config import RunConfigError, load_run_config
    from tensorpoly_ds.engine.data import PreparedData
    from tensorpoly_ds.engine.distributed import accelerate_overrides, distributed_env
    from tensorpoly_ds.engine.rank_status import write_status
    from tpds_common.locking import FolderLock

    # Everything checkable is checked before a process group, model or dataset is created; a refusal is a
    # UserError (config, data, launcher, checkpoint), reported by report_user_errors with exit 2.
    # `accelerate launch`: its DeepSpeed plugin settings, after the files, before the command line
    launcher_overrides = accelerate_overrides()
    cfg = load_run_config(args.config, launcher_overrides + args.overrides)
    if not cfg.data.dir:
        raise RunConfigError("key 'data.dir' is empty: set it to a prepared data directory")
    data = PreparedData.open(cfg.data.dir)
    from tensorpoly_ds.engine.ds_config import fill_ds_config

    launch = distributed_env()  # the launcher's world size, known before any process group
    fill_ds_config(cfg, int(launch["WORLD_SIZE"]))  # template errors, fp16 and the batch sizes surface here
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    if args.export_only:
        if args.resume == "none":
            raise RunConfigError("--export-only exports a checkpoint: it cannot be combined with --resume none")
        if not any(ckpt.check_structure(tag) is None for _, tag in ckpt.list_tags(ckpt_dir)) and args.resume == "auto":
            raise ckpt.CheckpointError(f"--export-only: no complete checkpoint in {ckpt_dir}")
    ckpt.precheck(ckpt_dir, args.resume)
    world = int(launch["WORLD_SIZE"])  # another world size: refusals that need no process group
    elastic.precheck(
        elastic.candidate(ckpt_dir, args.resume),
        world=world,
        optimizer=cfg.optim.name,
        batch=None if args.export_only else elastic.batch_layout(cfg.train.micro_batch, cfg.train.grad_accum, world),
    )

    rank = int(launch["RANK"])
    # One run per run.dir: rank 0 holds its lock (a second run's rank 0 exits 75 with LockHeld; its other
    # ranks then fail at the rendezvous instead of interleaving checkpoints with ours).
    lock = FolderLock(cfg.run.dir, what="pretraining run directory") if rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        write_status(cfg.run.dir, rank, "running", launcher=launch["LAUNCHER"])
        try:
            result = _run(args, cfg, data, launcher_overrides)
        except UserError as err:
            write_status(cfg.run.dir, rank, "failed", exit_code=err.exit_code, error=str(err)[:2000])
            if isinstance(err, CheckpointError) and rank != 0:
                return err.exit_code  # the collective checks give every rank this verdict: rank 0 reports it
            raise
        except BaseException as err:
            write_status(
                cfg.run.dir, rank, "failed", exit_code=EXIT_FAILED, error=f"{type(err).__name__}: {err}"[:2000]
            )
            raise
        write_status(cfg.run.dir, rank, result.status, exit_code=result.exit_code, step=result.step)
        return result.exit_code
    finally:
        if lock is not None:
            lock.release()


def _run(args, cfg, data, launcher_overrides: list[str]):
    from tensorpoly_ds.engine import distributed as dist
    from tensorpoly_ds.engine.config import save_run_config

    rank, world, device = dist.init_distributed()
    from tensorpoly_ds.engine.checkpoint import seed_all
    from tensorpoly_ds.engine.ds_config import fill_ds_config, save_json
    from tensorpoly_ds.engine.model import build_backbone, prepare_model
    from tensorpoly_ds.engine.trainer import DataOptions, Trainer
    from tpds_common.log import get_logger

    log = get_logger("tensorpoly-ds")
    run_dir = Path(cfg.run.dir)
    ds_config = fill_ds_config(cfg, world)
    if rank == 0:
        if launcher_overrides:
            log.info(f"accelerate launch: {' '.join(launcher_overrides)}")
        save_run_config(cfg, run_dir / "config.yaml")
        save_json(ds_config, run_dir / "ds_config.json")
    seed_all(cfg.train.seed)  # identical initial weights on every rank
    model, keepalive = build_backbone(
        cfg.model, vocab_size=data.vocab_size, ds_config=ds_config, precision=cfg.deepspeed.precision
    )
    if rank == 0 and cfg.deepspeed.zero_stage == 3:  # the backbone alone: adapters are partitioned later
        partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        log.info(f"ZeRO-3: backbone partitioned at load (zero.Init): {partitioned}")
    model = prepare_model(
        model, cfg.adapter, len(data.tasks), full_finetune=cfg.train.full_finetune, zero_stage=cfg.deepspeed.zero_stage
    )
    train_rows = data.split("train")
    val_rows = data.split("val") if (data.dir / "val").is_dir() else None
    steps = cfg.train.steps
    if args.export_only:
        cfg.train.steps = 0
    result = Trainer(
        model,
        train_rows,
        optim=cfg.optim,
        train=cfg.train,
        deepspeed=cfg.deepspeed,
        run_dir=run_dir,
        tasks=data.tasks,
        val_rows=val_rows,
        data=DataOptions.of(cfg.data, data.eos_token_id),
        ds_config=ds_config,
        fingerprint={"hash": cfg.fingerprint()},
        export_extra={"backbone": backbone_record(cfg, data.vocab_size)},
    ).run(args.resume)
    cfg.train.steps = steps
    del keepalive
    if rank == 0:
        log.info(
            f"{result.status} at step {result.step}; run dir {run_dir}"
            + (f"; export {result.export_dir}" if result.export_dir else "")
        )
    return result


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
