"""`tensorpoly-ds adapt`: one few-shot adaptation job (or zero-shot evaluation), or one row of a job table.

    tensorpoly-ds adapt --export runs/pre/export --data runs/data --task rte --mode z --seed 0 --out runs/adapt/x
    tensorpoly-ds adapt --job-table runs/sweep/jobs.jsonl --row 7          # what a Slurm array task runs
    tensorpoly-ds adapt --job-table runs/sweep/jobs.jsonl                  # row = $SLURM_ARRAY_TASK_ID

Exit status (tpds_common.errors): 0 done (or already complete), 1 failed with a bug (a traceback; OUT/result.json
has the error), 2 bad input: arguments, a job the launcher's ranks cannot run (refused before anything is
imported or started), or data, an export or a checkpoint found unusable during the job (one line;
OUT/result.json has it too), 75 another live process holds the job folder, 124 stopped by
SIGTERM/SIGINT/SIGUSR1 after checkpointing in OUT (rerun to resume), 130 aborted by a second Ctrl-C (no
checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Light imports only up to the pre-checks (no torch): an impossible job is refused in well under a second.
from tensorpoly_ds.adapt.spec import AdaptJob, JobError
from tensorpoly_ds.adapt.table import TableError, table_job
from tensorpoly_ds.engine.distributed import distributed_env
from tensorpoly_ds.engine.job_env import stop_with_parent
from tensorpoly_ds.engine.stop import STOP
from tpds_common.config import apply_overrides
from tpds_common.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_REQUEUE, report_user_errors
from tpds_common.files import read_text
from tpds_common.log import add_logging_arguments, setup_from_args

PROG = "tensorpoly-ds adapt"

# flag -> job field for the common fields; everything else via --set FIELD=VALUE (VALUE parsed as YAML, so JSON
# works too; tpds_common.config)
FLAGS = {
    "export": str,
    "method": str,
    "mode": str,
    "task": str,
    "seed": int,
    "k": int,
    "data": str,
    "out": str,
    "model": str,
    "steps": int,
    "batch_size": int,
    "lr": float,
    "eval_every": int,
    "length_norm": float,
    "label": str,
}
RENAME = {"data": "data_dir", "out": "out_dir"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("job source (one of)")
    src.add_argument("--job-table", help="JSON Lines job table written by `tensorpoly-ds sweep`")
    src.add_argument("--row", type=int, help="row of --job-table (default: $SLURM_ARRAY_TASK_ID)")
    src.add_argument("--job", help="a JSON file with one job's fields")
    fields = p.add_argument_group("job fields (override --job; ignored with --job-table)")
    for name, typ in FLAGS.items():
        fields.add_argument(f"--{name.replace('_', '-')}", type=typ, dest=name, default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other job field, VALUE as YAML or JSON (e.g. --set multitask_steps=20 --set "
        "collapse=true --set lr=1e-3 --set adapter.rank=2); also overrides fields of a "
        "--job-table row",
    )
    p.add_argument("--force", action="store_true", help="rerun even if the job is complete")
    p.add_argument("--print-job", action="store_true", help="print the resolved job as JSON and exit")
    add_logging_arguments(p)
    return p


def resolve_job(args) -> AdaptJob:
    from tensorpoly_ds.adapt.spec import launcher_job_fields

    launcher = launcher_job_fields()  # `accelerate launch`: its ZeRO stage and precision, before --set
    if args.job_table:
        row = args.row
        if row is None:
            env = os.environ.get("SLURM_ARRAY_TASK_ID")
            if env is None or not env.strip().isdigit():
                raise TableError(f"--job-table needs --row (or $SLURM_ARRAY_TASK_ID, a row number; got {env!r})")
            row = int(env)
        job = table_job(args.job_table, row)
        if not args.set and not launcher:
            return job
        data = job.to_dict()  # --set overrides a table row (e.g. a smaller eval batch on one cluster)
    else:
        data = {}
        if args.job:
            data = _read_job_file(args.job)
        for name in FLAGS:
            value = getattr(args, name)
            if value is not None:
                data[RENAME.get(name, name)] = value
    data.update(launcher)
    # tpds_common.config's dotted overrides: VALUE as YAML (JSON included), a dotted FIELD sets a key of a
    # mapping field (adapter.rank=2)
    apply_overrides(data, args.set, {}, JobError, label="--set")
    return AdaptJob.from_dict(data, source="command line")


def _read_job_file(path: str) -> dict:
    try:
        data = json.loads(read_text(path, JobError, "--job file"))
    except json.JSONDecodeError as err:
        raise JobError(f"--job {path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise JobError(f"--job {path}: expected a JSON object of job fields, got {type(data).__name__}")
    return data


def check_world(job: AdaptJob, env=None) -> None:
    """Refuse what the launcher's ranks cannot run, from its variables alone (before any process group)."""
    world = int(distributed_env(env)["WORLD_SIZE"])
    if world == 1:
        return
    if job.trainer == "local":
        raise JobError(
            f"job field 'trainer' = 'local' runs one process, but the launcher started {world} ranks; "
            "use trainer 'engine' (or 'auto')"
        )
    sizes = [("batch_size", job.batch_size)] + (
        [("multitask_batch_size", job.multitask_batch_size)] if job.multitask_steps > 0 else []
    )
    for name, value in sizes:
        if value % world:
            raise JobError(
                f"job field {name!r} = {value} does not divide over the launcher's {world} ranks "
                f"(WORLD_SIZE={world}); use a multiple of {world}"
            )


def main(argv: list[str] | None = None) -> int:
    with STOP.handling():  # first: a stop request while the model loads is kept, not fatal
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    stop_with_parent()  # a row of a sweep: a killed sweep leaves no orphan
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    job = resolve_job(args)
    if args.print_job:
        print(json.dumps(job.to_dict(), indent=2, sort_keys=True))
        return EXIT_OK
    check_world(job)
    from tensorpoly_ds.adapt.job import run_job

    # A failure is recorded in OUT/result.json (status failed) by run_job, then reported by
    # report_user_errors: one line for a user error (JobBusy: 75), a traceback for a bug.
    try:
        result = run_job(job, force=args.force)
    except KeyboardInterrupt:
        print(
            "tensorpoly-ds adapt: aborted (second Ctrl-C) without a checkpoint; the job will rerun from scratch",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    import torch.distributed as dist

    main_rank = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if result.get("status") == "requeue":
        if main_rank:
            print(
                f"tensorpoly-ds adapt: stopped ({result['signal']}) at {result['stopped']['phase']} step "
                f"{result['stopped']['step']}; checkpoint in {job.out_dir}: rerun to resume",
                file=sys.stderr,
            )
        return EXIT_REQUEUE
    if main_rank:
        print(json.dumps({"out_dir": job.out_dir, "final": result["final"], "best": result["best"]}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
