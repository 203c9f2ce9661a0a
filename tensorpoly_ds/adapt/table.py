"""Job tables: one JSON object per line, row i = Slurm array task i. Expansion of a sweep grid, and running a
table locally (`run_table`, what `tensorpoly-ds sweep` does) through the subprocess scheduler."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
from pathlib import Path

from tpds_common.config import check_fields, read_yaml, reject_unknown
from tpds_common.errors import ConfigError
from tpds_common.files import read_text
from tpds_common.locking import holder_if_locked
from tpds_common.log import get_logger

from ..engine.scheduler import FINAL, Job, Scheduler
from .spec import FULLFT, AdaptJob, JobError, is_complete

log = get_logger("sweep")
ROUTED = ("poly", "mhr", "tensorpoly_i", "tensorpoly_ii", "tensorpoly_x")


class TableError(ConfigError):
    """A grid or job table is invalid or unreadable; the message names the file and the row or key."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def read_grid(path: str | os.PathLike) -> dict:
    if str(path).endswith((".yaml", ".yml")):
        grid = read_yaml(path, TableError)
    else:
        try:
            grid = json.loads(read_text(path, TableError, "grid"))
        except json.JSONDecodeError as err:
            raise TableError(f"{path}: not JSON ({err})") from None
    if not isinstance(grid, dict):
        raise TableError(f"{path}: a grid is a mapping with 'methods', 'modes', 'tasks', 'seeds' (and 'base')")
    return grid


def _method_of(entry: dict) -> str | None:
    if entry.get("method"):
        return entry["method"]
    if entry.get("export"):
        from ..adapters import read_export_meta

        return read_export_meta(entry["export"])["adapter"]["method"]
    return None


GRID_KEYS = ("base", "methods", "modes", "tasks", "seeds", "ks", "overrides")
# Per-row fields that depend on the method, mode, task, seed or k of the row: an override cannot set them.
ROW_FIELDS = ("label", "mode", "task", "seed", "k", "out_dir", "export", "method")


def task_overrides(grid: dict, tasks: list[str], source: str) -> dict[str, dict]:
    """`overrides: {task: {job field: value}}`, checked: every task is one of the grid's tasks or a T0 held-out
    task (data_prep/resources/t0_tasks.json), every field a job field that is not set per row."""
    overrides = grid.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise TableError(f"{source}: 'overrides' must map task names to job fields, got {type(overrides).__name__}")
    from data_prep.mixture import load_t0_tasks

    known_tasks = set(tasks) | {t["task"] for t in load_t0_tasks()["held_out_eval"]}
    fields = {f.name for f in dataclasses.fields(AdaptJob)} - set(ROW_FIELDS)
    for task, values in overrides.items():
        if task not in known_tasks:
            raise TableError(
                f"{source}: overrides.{task}: unknown task {task!r}; tasks of this grid: {', '.join(tasks)}"
            )
        if not isinstance(values, dict):
            raise TableError(f"{source}: overrides.{task} must map job fields to values, got {values!r}")
        for key in values:
            if key not in fields:
                raise TableError(
                    f"{source}: overrides.{task}.{key}: not a job field an override can set; "
                    f"valid: {', '.join(sorted(fields))}"
                )
    return overrides


def expand_grid(
    grid: dict, out_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None, source: str = "grid"
) -> list[dict]:
    """methods x modes x tasks x seeds x ks -> rows {"row", "id", "job"} in this fixed, stable order.

    grid = {"base": {job fields shared by all rows, e.g. data_dir, steps},
            "methods": [{"label": ..., "export": DIR} | {"label": ..., "method": "fullft"|"lora"|..., ...}],
            "modes": ["full", "z", "mu"], "tasks": [...] or "held_out", "seeds": [0, 1024, 42], "ks": [null],
            "overrides": {task: {job fields for that task's rows, e.g. batch_size: 4, grad_accum: 2}}}
    Unrouted methods only get mode "full" (other modes are skipped, not errors). A task's overrides win over
    base and the method entry. `source` (the grid file) names the grid in errors."""
    reject_unknown(grid, GRID_KEYS, source, TableError)
    # the base job: job fields of the right types (checked once here, every row again with its own fields)
    base = check_fields(AdaptJob, grid.get("base") or {}, f"{source}: base", JobError, what="job field")
    methods = grid.get("methods") or []
    if not methods:
        raise TableError(f"{source}: 'methods' is empty")
    modes = grid.get("modes") or ["full"]
    seeds = grid.get("seeds") or [0, 1024, 42]
    ks = grid.get("ks") or [base.pop("k", None)]
    tasks = grid.get("tasks") or "held_out"
    rel = Path(base_dir) if base_dir else None

    def resolve(p):
        return str((rel / p).resolve()) if (rel and p and not os.path.isabs(p)) else p

    if "data_dir" in base:
        base["data_dir"] = resolve(base["data_dir"])
    if tasks == "held_out":
        if "data_dir" not in base:
            raise TableError(f"{source}: tasks 'held_out' needs base.data_dir")
        from data_prep.manifest import read_manifest

        tasks = list(read_manifest(base["data_dir"]).held_out)
    overrides = task_overrides(grid, list(tasks), source)
    rows, ids = [], set()
    for m_i, entry in enumerate(methods):
        if isinstance(entry, str):
            entry = {"export": entry}
        entry = dict(entry)
        if "export" in entry:
            entry["export"] = resolve(entry["export"])
        method = _method_of(entry)
        label = entry.get("label") or (Path(entry["export"]).name if entry.get("export") else method)
        for mode, task, seed, k in itertools.product(modes, tasks, seeds, ks):
            if mode != "full" and method not in ROUTED:
                continue
            job_id = _slug(f"{label}__{mode}__{task}__k{'auto' if k is None else k}__s{seed}")
            if job_id in ids:
                raise TableError(f"{source}: two rows get the id {job_id!r}; give the methods distinct labels")
            ids.add(job_id)
            fields = {
                **base,
                **entry,
                **overrides.get(task, {}),
                "label": label,
                "mode": mode,
                "task": task,
                "seed": seed,
                "k": k,
                "out_dir": str(Path(out_dir) / "jobs" / job_id),
            }
            # validated now, not on the cluster; the row holds every field (defaults filled in)
            job = AdaptJob.from_dict(fields, source=f"grid row {job_id}").to_dict()
            rows.append({"row": len(rows), "id": job_id, "job": job})
    return rows


def write_table(path: str | os.PathLike, rows: list[dict]) -> Path:
    """The job table: JSON Lines, one job per line, written atomically (row i = array task i)."""
    from ..evaluation.rank_classification import write_jsonl  # torch: only when a table is written

    return write_jsonl(path, rows)


def read_table(path: str | os.PathLike) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path, TableError, "job table").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TableError(f"{path}:{n}: not JSON ({err})") from None
        if row.get("row") != len(rows) or "job" not in row:
            raise TableError(f"{path}:{n}: expected row {len(rows)} with a 'job' object")
        rows.append(row)
    return rows


def table_job(path: str | os.PathLike, row: int) -> AdaptJob:
    rows = read_table(path)
    if not 0 <= row < len(rows):
        raise TableError(f"{path}: row {row} out of range (the table has {len(rows)} rows, 0..{len(rows) - 1})")
    return AdaptJob.from_dict(rows[row]["job"], source=f"{path} row {row}")


def run_table(
    table: Path, out: Path, rows: list[dict], selected: list[int], workers: int, threads: int, stop_grace: float = 120.0
) -> dict[str, list[int]]:
    """Run the selected rows of `table`, each as `python -m launch.adapt --job-table TABLE --row i` in its job
    folder's log.txt, with `workers` concurrent jobs; complete rows are skipped and rows another live process
    holds (the job folder's lock) are waited for. Returns the row numbers per outcome: {"skipped", "done",
    "failed", "stopped" (checkpointed by a stop request), "killed", "not_started"} (engine.scheduler; a stop
    request is STOP, installed by the entry point)."""

    def job(i: int) -> Job:
        folder = Path(rows[i]["job"]["out_dir"])
        return Job(
            name=f"row {i} {rows[i]['id']}",
            argv=[sys.executable, "-m", "launch.adapt", "--job-table", str(table), "--row", str(i)],
            log=folder / "log.txt",
            done=lambda: is_complete(folder),
            holder=lambda: holder_if_locked(folder),
            key=i,
        )

    scheduler = Scheduler(
        [job(i) for i in selected], workers=workers, threads=threads, scratch=out, log=log, stop_grace=stop_grace
    )
    log.info(
        f"{len(selected)} rows: {len(scheduler.skipped)} complete, {len(scheduler.pending)} to run, {workers} worker(s)"
    )
    report = scheduler.run()
    return {o.value: sorted(report.keys(o)) for o in FINAL}


__all__ = [
    "TableError",
    "expand_grid",
    "read_grid",
    "read_table",
    "run_table",
    "table_job",
    "write_table",
    "FULLFT",
    "JobError",
]
