"""Collect adaptation results into the papers' tables and plots.

Every job directory (one holding job.json or result.json) below the given run directories is
classified as complete (result.json status complete and the COMPLETE marker), failed (status failed),
incomplete (started, no final result: crashed, stopped with a checkpoint ("requeue") or still running) or
broken (unreadable). Job tables
(jobs.jsonl) found in the run directories, or given explicitly, add the rows that never started
(missing). Nothing is dropped silently: every non-complete job is listed in the report and on stderr.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tpds_common.errors import ConfigError
from tpds_common.files import atomic_write_text
from tpds_common.log import get_logger

from ..figures import save_figure
from .job import MARKER_FILE, RESULT_FILE
from .table import read_table

log = get_logger("report")

MODE_ORDER = {"full": 0, "z": 1, "mu": 2}


@dataclass
class Collected:
    results: list[dict] = field(default_factory=list)  # complete result.json contents (+ "_dir")
    problems: list[dict] = field(default_factory=list)  # {"dir", "state", "detail", "job"}


def _job_key(job: dict) -> tuple:
    return (job.get("label"), job.get("mode"), job.get("task"), job.get("seed"), job.get("k"))


def collect(run_dirs: list[str | os.PathLike], tables: list[str | os.PathLike] = ()) -> Collected:
    out = Collected()
    seen_dirs: set[Path] = set()
    table_files = [Path(t) for t in tables]
    for root in map(Path, run_dirs):
        if not root.exists():
            out.problems.append(
                {"dir": str(root), "state": "missing", "detail": "run directory does not exist", "job": {}}
            )
            continue
        table_files += sorted(root.rglob("jobs.jsonl"))
        job_dirs = {p.parent for p in root.rglob(RESULT_FILE)} | {p.parent for p in root.rglob("job.json")}
        for d in sorted(job_dirs):
            if d.resolve() in seen_dirs:
                continue
            seen_dirs.add(d.resolve())
            _classify(d, out)
    for table in dict.fromkeys(t.resolve() for t in table_files):
        try:
            rows = read_table(table)
        except Exception as err:  # a broken table is reported, not fatal
            out.problems.append(
                {"dir": str(table), "state": "broken", "detail": f"job table unreadable: {err}", "job": {}}
            )
            continue
        for row in rows:
            d = Path(row["job"]["out_dir"]).resolve()
            if d not in seen_dirs:
                seen_dirs.add(d)
                if d.exists():
                    _classify(d, out)
                else:
                    out.problems.append(
                        {
                            "dir": str(d),
                            "state": "missing",
                            "job": row["job"],
                            "detail": f"row {row['row']} of {table} never ran",
                        }
                    )
    return out


def _classify(d: Path, out: Collected) -> None:
    job: dict = {}
    try:
        job = json.loads((d / "job.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    rpath = d / RESULT_FILE
    if not rpath.exists():
        out.problems.append(
            {
                "dir": str(d),
                "state": "incomplete",
                "job": job,
                "detail": "started but no result.json (crashed, killed or still running)",
            }
        )
        return
    try:
        result = json.loads(rpath.read_text())
        job = result.get("job", job)
    except (OSError, json.JSONDecodeError) as err:
        out.problems.append({"dir": str(d), "state": "broken", "job": job, "detail": f"result.json: {err}"})
        return
    status = result.get("status")
    if status == "failed":
        out.problems.append(
            {"dir": str(d), "state": "failed", "job": job, "detail": str(result.get("error", "unknown error"))}
        )
    elif status == "requeue":
        stopped = result.get("stopped") or {}
        out.problems.append(
            {
                "dir": str(d),
                "state": "incomplete",
                "job": job,
                "detail": f"stopped ({result.get('signal', '?')}) at {stopped.get('phase', '?')} step "
                f"{stopped.get('step', '?')} with a checkpoint: rerun adapt or the sweep to resume",
            }
        )
    elif status != "complete" or not (d / MARKER_FILE).exists():
        out.problems.append(
            {
                "dir": str(d),
                "state": "incomplete",
                "job": job,
                "detail": f"status {status!r}, marker {'present' if (d / MARKER_FILE).exists() else 'absent'}",
            }
        )
    else:
        try:
            float(result["final"]["accuracy"])
            result["label"], result["task"], result["mode"]
        except (KeyError, TypeError, ValueError) as err:
            out.problems.append({"dir": str(d), "state": "broken", "job": job, "detail": f"result.json lacks {err}"})
            return
        out.results.append({**result, "_dir": str(d)})


# --- aggregation -------------------------------------------------------------------------------------------


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def setting(r: dict) -> str:
    """'' for few-shot training; '0-shot' without training; '+mt' marks extra multi-task steps (MHR's recipe)."""
    mt = int((r.get("job") or {}).get("multitask_steps") or 0) > 0
    if r.get("zero_shot") or r.get("k") == 0:
        return "0-shot+mt" if mt else "0-shot"
    return "+mt" if mt else ""


def row_key(r: dict) -> tuple[str, str]:
    """(method label, mode with the setting): zero-shot and few-shot results of one method are separate rows."""
    s = setting(r)
    return (r["label"], f"{r['mode']} ({s})" if s else r["mode"])


def _mode_rank(mode: str) -> tuple:
    base, _, rest = mode.partition(" ")
    return (MODE_ORDER.get(base, 9), base, rest)


AGGREGATES = ("median", "mean")


def aggregate(results: list[dict], metric: str = "final", task_order: list[str] | None = None) -> dict:
    """cells[(label, mode)][task] = {median, min, max, q1, q3, mean, std, n, seeds, values}, accuracies in %;
    std is the sample standard deviation over seeds (n - 1; None for a single seed)."""
    values: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    duplicates = []
    for r in results:
        acc = 100.0 * float(r[metric]["accuracy"])
        seeds = values[row_key(r)][r["task"]]
        if r["seed"] in seeds:
            duplicates.append(r["_dir"])
        seeds[r["seed"]] = acc
    rows = sorted(values, key=lambda k: (k[0], _mode_rank(k[1])))
    present = {t for v in values.values() for t in v}
    # the given column order (e.g. the paper's), then any other task alphabetically
    tasks = [t for t in (task_order or []) if t in present] + sorted(present - set(task_order or []))
    cells: dict[tuple, dict[str, dict]] = {}
    for key in rows:
        cells[key] = {}
        for task, by_seed in values[key].items():
            xs = [by_seed[s] for s in sorted(by_seed)]
            cells[key][task] = {
                "median": statistics.median(xs),
                "min": min(xs),
                "max": max(xs),
                "q1": quantile(xs, 0.25),
                "q3": quantile(xs, 0.75),
                "mean": statistics.fmean(xs),
                "std": statistics.stdev(xs) if len(xs) > 1 else None,
                "n": len(xs),
                "seeds": sorted(by_seed),
                "values": xs,
            }
    return {"rows": rows, "tasks": tasks, "cells": cells, "duplicates": duplicates}


def row_average(cells: dict[str, dict], tasks: list[str], aggregate_by: str = "median") -> float | None:
    """Mean over tasks of the per-task medians (or means); None unless every task has a cell."""
    if not tasks or any(t not in cells for t in tasks):
        return None
    return sum(cells[t][aggregate_by] for t in tasks) / len(tasks)


def row_seed_std(cells: dict[str, dict], tasks: list[str]) -> float | None:
    """Standard deviation over seeds of the per-seed average over tasks (MHR's spread of the average), on the
    seeds every task has; None unless every task has a cell and at least two seeds are common."""
    if not tasks or any(t not in cells for t in tasks):
        return None
    common = set.intersection(*(set(cells[t]["seeds"]) for t in tasks))
    if len(common) < 2:
        return None
    per_seed = [statistics.fmean(cells[t]["values"][cells[t]["seeds"].index(s)] for t in tasks) for s in sorted(common)]
    return statistics.stdev(per_seed)


def format_cell(c: dict, spread: str = "minmax", aggregate_by: str = "median") -> str:
    if aggregate_by == "mean":
        return f"{c['mean']:.1f} ± {c['std']:.1f} (n={c['n']})" if c["std"] is not None else f"{c['mean']:.1f} (n=1)"
    lo, hi = (c["min"], c["max"]) if spread == "minmax" else (c["q1"], c["q3"])
    return f"{c['median']:.1f} ({lo:.1f}–{hi:.1f}, n={c['n']})"


def format_average(cells: dict[str, dict], tasks: list[str], aggregate_by: str = "median") -> str:
    avg = row_average(cells, tasks, aggregate_by)
    if avg is None:
        return "—"
    std = row_seed_std(cells, tasks) if aggregate_by == "mean" else None
    return f"{avg:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def table1_markdown(agg: dict, spread: str = "minmax", aggregate_by: str = "median") -> str:
    tasks = agg["tasks"]
    head = "| Method | Mode | " + " | ".join(tasks) + " | Avg |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for key in agg["rows"]:
        cells = agg["cells"][key]
        parts = [format_cell(cells[t], spread, aggregate_by) if t in cells else "—" for t in tasks]
        lines.append(
            f"| {key[0]} | {key[1]} | " + " | ".join(parts) + f" | {format_average(cells, tasks, aggregate_by)} |"
        )
    return "\n".join(lines) + "\n"


def table1_csv(agg: dict) -> str:
    """One line per cell with both aggregates; the `avg` line holds the mean of the task medians (median
    column) and of the task means with MHR's seed spread of the average (mean, std columns)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    stats = ("median", "min", "max", "q1", "q3", "mean", "std")
    w.writerow(["method", "mode", "task", *stats, "n", "seeds"])

    def num(x):
        return "" if x is None else f"{x:.4f}"

    for key in agg["rows"]:
        cells = agg["cells"][key]
        for t in agg["tasks"]:
            c = cells.get(t)
            if c is None:
                w.writerow([key[0], key[1], t, *[""] * len(stats), 0, ""])
            else:
                w.writerow([key[0], key[1], t, *(num(c[x]) for x in stats), c["n"], " ".join(map(str, c["seeds"]))])
        tasks = agg["tasks"]
        w.writerow(
            [
                key[0],
                key[1],
                "avg",
                num(row_average(cells, tasks)),
                "",
                "",
                "",
                "",
                num(row_average(cells, tasks, "mean")),
                num(row_seed_std(cells, tasks)),
                "",
                "",
            ]
        )
    return buf.getvalue()


def params_table(results: list[dict]) -> list[dict]:
    """One row per method label: multi-task (pretraining) parameters and adaptation parameters per mode."""
    by_label: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (r["label"], MODE_ORDER.get(r["mode"], 9))):
        row = by_label.setdefault(
            r["label"], {"method": r["label"], "multi_task": None, "modules": None, "routing": None, "adaptation": {}}
        )
        mt = (r.get("params") or {}).get("multi_task")
        if mt and row["multi_task"] is None:
            row.update(multi_task=mt.get("total"), modules=mt.get("modules"), routing=mt.get("routing"))
        trainable = (r.get("params") or {}).get("trainable")
        if trainable is not None:
            row["adaptation"].setdefault(r["mode"], trainable)
    return list(by_label.values())


def params_markdown(rows: list[dict]) -> str:
    modes = sorted({m for r in rows for m in r["adaptation"]}, key=lambda m: MODE_ORDER.get(m, 9))

    def n(x):
        return "—" if x is None else f"{x:,}"

    lines = [
        "| Method | Multi-task params | modules | routing | " + " | ".join(f"Adaptation ({m})" for m in modes) + " |",
        "|" + "---|" * (4 + len(modes)),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {n(r['multi_task'])} | {n(r['modules'])} | {n(r['routing'])} | "
            + " | ".join(n(r["adaptation"].get(m)) for m in modes)
            + " |"
        )
    return "\n".join(lines) + "\n"


def params_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    modes = sorted({m for r in rows for m in r["adaptation"]}, key=lambda m: MODE_ORDER.get(m, 9))
    w.writerow(["method", "multi_task", "modules", "routing", *[f"adaptation_{m}" for m in modes]])
    for r in rows:
        w.writerow(
            [r["method"], r["multi_task"], r["modules"], r["routing"], *[r["adaptation"].get(m, "") for m in modes]]
        )
    return buf.getvalue()


def problems_markdown(problems: list[dict]) -> str:
    if not problems:
        return "All jobs complete.\n"
    lines = ["| State | Method | Mode | Task | Seed | Directory | Detail |", "|---|---|---|---|---|---|---|"]
    for p in sorted(problems, key=lambda p: (p["state"], p["dir"])):
        j = p.get("job") or {}
        detail = str(p["detail"]).replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(
            f"| {p['state']} | {j.get('label') or j.get('method') or j.get('export') or ''} | "
            f"{j.get('mode', '')} | {j.get('task', '')} | {j.get('seed', '')} | {p['dir']} | {detail} |"
        )
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------------------------


def plot_accuracy(agg: dict, path: Path, aggregate_by: str = "median") -> Path | None:
    if not agg["rows"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = agg["tasks"], agg["rows"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(rows) / 3)), 4))
    for i, key in enumerate(rows):
        xs, med, lo, hi = [], [], [], []
        for j, t in enumerate(tasks):
            c = agg["cells"][key].get(t)
            if c is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            if aggregate_by == "mean":
                med.append(c["mean"])
                lo.append(c["std"] or 0.0)
                hi.append(c["std"] or 0.0)
            else:
                med.append(c["median"])
                lo.append(c["median"] - c["min"])
                hi.append(c["max"] - c["median"])
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=f"{key[0]} ({key[1]})")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(
        "mean over seeds; error bars: ± std" if aggregate_by == "mean" else "median over seeds; error bars: min–max",
        fontsize="small",
    )
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def routing_matrix(path: Path) -> tuple[list[str], list[list[float]]]:
    """Rows = routing tables (layers), columns = skills; weights averaged over heads."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    names = sorted(k[: -len(".weights")] for k in state if k.endswith(".weights"))
    return names, [state[f"{n}.weights"].float().mean(dim=0).tolist() for n in names]


def plot_routing(results: list[dict], out: Path) -> list[Path]:
    """One PNG per (method, mode) with a heatmap per adapted task (first seed present)."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in sorted(results, key=lambda r: r["seed"]):
        if r.get("routing_file") and r["mode"] in ("full", "z") and not setting(r).startswith("0-shot"):
            groups[row_key(r)].setdefault(r["task"], r)
    if not groups:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (label, mode), by_task in sorted(groups.items()):
        mats = []
        for task, r in sorted(by_task.items()):
            try:
                mats.append((task, r["seed"], *routing_matrix(Path(r["_dir"]) / r["routing_file"])))
            except Exception as err:  # an unreadable routing file is reported, the rest still plots
                log.warning(f"{r['_dir']}: cannot read routing weights ({err})")
        if not mats:
            continue
        fig, axes = plt.subplots(
            1, len(mats), figsize=(3 + 2.5 * len(mats), 0.5 + 0.18 * len(mats[0][2]) + 1.5), squeeze=False
        )
        for ax, (task, seed, names, mat) in zip(axes[0], mats):
            im = ax.imshow(mat, aspect="auto", cmap="viridis")  # colour range = this task's weights
            ax.set_title(f"{task} (seed {seed})", fontsize="small")
            ax.set_xlabel("skill")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels([_short(n) for n in names], fontsize=5)
            fig.colorbar(im, ax=ax, fraction=0.05)
        fig.suptitle(f"routing weights: {label} ({mode})")
        fig.tight_layout()
        path = out / f"routing_{_slug(label)}_{_slug(mode)}.png"
        save_figure(fig, path)
        written.append(path)
    return written


def _short(table_name: str) -> str:
    """'decoder__block__1__layer__2__DenseReluDense__wi_0' -> 'dec.1.2.DenseReluDense.wi_0'."""
    name = table_name.replace("__", ".")
    for long, short in (("encoder.block.", "enc."), ("decoder.block.", "dec."), ("layer.", "")):
        name = name.replace(long, short)
    return name[-36:]


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# --- the report --------------------------------------------------------------------------------------------


def build_report(
    run_dirs: list[str],
    out_dir: str | os.PathLike,
    *,
    tables: list[str] = (),
    metric: str = "final",
    spread: str = "minmax",
    plots: bool = True,
    task_order: list[str] | None = None,
    aggregate_by: str = "median",
) -> dict:
    """`aggregate_by`: "median" (with `spread`, TensorPoly's tables) or "mean" (± std, MHR's tables)."""
    if aggregate_by not in AGGREGATES:
        raise ConfigError(f"aggregate_by = {aggregate_by!r}: valid values: {', '.join(AGGREGATES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    col = collect(run_dirs, tables)
    agg = aggregate(col.results, metric, task_order)
    params = params_table(col.results)
    files = {}
    t1 = table1_markdown(agg, spread, aggregate_by)
    atomic_write_text(out / "table1.md", t1)
    atomic_write_text(out / "table1.csv", table1_csv(agg))
    atomic_write_text(out / "params.md", params_markdown(params))
    atomic_write_text(out / "params.csv", params_csv(params))
    files.update(
        table1_md=out / "table1.md",
        table1_csv=out / "table1.csv",
        params_md=out / "params.md",
        params_csv=out / "params.csv",
    )
    plot_files: list[Path] = []
    if plots:
        for fn, args in (
            (plot_accuracy, (agg, out / "accuracy.png", aggregate_by)),
            (plot_routing, (col.results, out)),
        ):
            try:
                made = fn(*args)
            except Exception as e:  # plots are a bonus: a plotting failure must not lose the tables
                log.warning(f"plot {fn.__name__} failed: {type(e).__name__}: {e}")
                continue
            plot_files += [made] if isinstance(made, Path) else list(made or [])
    if aggregate_by == "mean":
        cells_text = (
            f"Cells: mean accuracy (%) over seeds of the **{metric}** evaluation ± sample standard "
            "deviation (n = seeds). Avg: mean of the task means ± the standard deviation over seeds of "
            "the per-seed average (seeds common to every task), only when every task has a cell."
        )
    else:
        spread_name = "min–max" if spread == "minmax" else "interquartile range"
        cells_text = (
            f"Cells: median accuracy (%) over seeds of the **{metric}** evaluation, ({spread_name}, "
            "n = seeds). Avg: mean of the task medians, only when every task has a cell."
        )
    md = [
        "# Adaptation results\n",
        f"{len(col.results)} complete jobs, {len(col.problems)} missing or failed. " + cells_text + "\n",
        "## Few-shot accuracy (Table 1 layout)\n",
        t1,
        "\n## Parameters (multi-task pretraining and adaptation)\n",
        params_markdown(params),
        "\n## Missing, failed and incomplete jobs\n",
        problems_markdown(col.problems),
    ]
    if agg["duplicates"]:
        md.append(f"\nDuplicate results for the same (method, mode, task, seed), last one kept: {agg['duplicates']}\n")
    if plot_files:
        md.append("\n## Plots\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plot_files))
    atomic_write_text(out / "report.md", "\n".join(md))
    for p in sorted(col.problems, key=lambda p: (p["state"], p["dir"])):
        log.warning(f"{p['state']}: {p['dir']}: {p['detail']}")
    log.info(f"{len(col.results)} results, {len(col.problems)} missing/failed -> {out}")
    return {
        "results": len(col.results),
        "problems": col.problems,
        "aggregate": agg,
        "files": files,
        "plots": plot_files,
    }
