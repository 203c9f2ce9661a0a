"""From finished jobs to the published results: dev/test split, learning-rate choice, tables, verdicts,
routing recovery, plots.

Protocol (docs/replicate.md):
- every job evaluates its held-out task once, after its last step (no early stopping on test data);
- the evaluation rows with example_id < dev_examples (manifest "latent_skills") are the dev split, the
  others the test split: accuracies are computed separately from the job's predictions.jsonl;
- the learning rate of each (method, mode, k) is the one of the shared grid with the best mean dev
  accuracy over tasks and seeds (ties: the smaller lr); only its test accuracies enter tables and verdicts;
- tables: median test accuracy over seeds per task, min-max spread, n (tensorpoly_ds.adapt.report);
- verdicts: paired comparisons over (task, seed) at the verdict k (tensorpoly_ds.analysis.claims);
- recovery: routing weights of every training task in each pretrained export against the manifest's
  task x skill matrix (tensorpoly_ds.analysis.recovery).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from tpds_common.log import get_logger

from ..adapt.report import aggregate, collect, plot_accuracy, row_average, setting, table1_markdown
from .config import ReplicateConfig

if TYPE_CHECKING:  # numpy is imported where the arrays are built
    import numpy as np

log = get_logger("analysis")


# --- per-job accuracies ------------------------------------------------------------------------------------


def split_accuracies(job_dir: Path, dev_examples: int) -> dict[str, float]:
    """Dev and test accuracy of a job's final evaluation (predictions.jsonl)."""
    hits: dict[str, list[bool]] = {"dev": [], "test": []}
    for line in (job_dir / "predictions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        hits["dev" if rec["example_id"] < dev_examples else "test"].append(bool(rec["correct"]))
    return {k: (sum(v) / len(v) if v else float("nan")) for k, v in hits.items()}


def row_name(r: dict) -> str:
    """The result row a job belongs to, as named in tables and claims files: 'Poly (z)',
    'Poly (mu, 0-shot)', 'Poly (mu, 0-shot, 50 mt steps)'."""
    mode = r["mode"]
    if setting(r).startswith("0-shot"):
        steps = int(r["job"].get("multitask_steps") or 0)
        return f"{r['label']} ({mode}, 0-shot" + (f", {steps} mt steps)" if steps else ")")
    return f"{r['label']} ({mode})"


def load_results(job_roots: list[Path], dev_examples: int) -> tuple[list[dict], list[dict]]:
    """(complete results with 'dev'/'test' accuracies and 'row', problems) under the given directories."""
    col = collect([str(p) for p in job_roots if p.exists()])
    results = []
    for r in col.results:
        acc = split_accuracies(Path(r["_dir"]), dev_examples)
        results.append(
            {
                **r,
                "dev": {"accuracy": acc["dev"]},
                "test": {"accuracy": acc["test"]},
                "row": row_name(r),
                "lr": float(r["job"]["lr"]),
            }
        )
    return results, col.problems


# --- learning-rate choice on the dev split ------------------------------------------------------------------


def select_lr(results: list[dict], search_seeds: list[int] | None = None) -> tuple[list[dict], list[dict]]:
    """Per (row, k): the lr of the grid with the best mean dev accuracy over tasks and the search seeds (ties:
    the smaller lr); returns (every result of the chosen lrs, the selection table with each lr's dev and test
    means over the search seeds). Rows with a single lr (zero-shot) keep it."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        groups[(r["row"], r["k"])][r["lr"]].append(r)
    selected, table = [], []
    for (row, k), by_lr in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        stats = {}
        for lr, rs in by_lr.items():
            searched = [x for x in rs if search_seeds is None or x["seed"] in search_seeds] or rs
            stats[lr] = {
                "dev": statistics.mean(x["dev"]["accuracy"] for x in searched),
                "test": statistics.mean(x["test"]["accuracy"] for x in searched),
                "n": len(searched),
            }
        best = max(sorted(stats), key=lambda lr: stats[lr]["dev"])  # max keeps the first (smallest) of ties
        selected += by_lr[best]
        table.append({"row": row, "k": k, "chosen_lr": best, "lrs": {f"{lr:g}": stats[lr] for lr in sorted(stats)}})
    return selected, table


# --- tables ---------------------------------------------------------------------------------------------------


def tables(selected: list[dict], tasks: list[str]) -> dict[int, dict]:
    """Per k: the Table 1 analogue (every method's few-shot row, modes full and mu-only methods) and the
    Table 4 analogue (routed methods in every mode), as report.aggregate() results on test accuracy."""
    out = {}
    few = [r for r in selected if not setting(r).startswith("0-shot")]
    for k in sorted({r["k"] for r in few}):
        at_k = [r for r in few if r["k"] == k]
        modes_of: dict[str, set] = defaultdict(set)
        for r in at_k:
            modes_of[r["label"]].add(r["mode"])
        t1 = [r for r in at_k if r["mode"] == "full" or modes_of[r["label"]] == {r["mode"]}]
        t4 = [r for r in at_k if len(modes_of[r["label"]]) > 1]
        out[k] = {"table1": aggregate(t1, "test", tasks), "table4": aggregate(t4, "test", tasks)}
    # one table row per zero-shot row name (report's row key does not tell multi-task step counts apart)
    zero = [{**r, "label": r["row"]} for r in selected if setting(r).startswith("0-shot")]
    if zero:
        out[0] = {"zero_shot": aggregate(zero, "test", tasks)}
    return out


def scores_by_row(selected: list[dict], k: int) -> dict[str, dict[tuple[str, int], float]]:
    """row name -> {(task, seed): test accuracy}: few-shot rows at k and every zero-shot row."""
    out: dict[str, dict] = defaultdict(dict)
    for r in selected:
        if r["k"] == k or setting(r).startswith("0-shot"):
            out[r["row"]][(r["task"], int(r["seed"]))] = r["test"]["accuracy"]
    return dict(out)


def agg_json(agg: dict) -> dict:
    """report.aggregate() output in JSON form (rows as 'label (mode)' names)."""
    rows = {}
    for key in agg["rows"]:
        name = f"{key[0]} ({key[1]})"
        rows[name] = {"cells": agg["cells"][key], "avg": row_average(agg["cells"][key], agg["tasks"])}
    return {"tasks": agg["tasks"], "rows": rows}


# --- routing recovery (C7) ---------------------------------------------------------------------------------------


def routing_features(export: Path, backbone: Path) -> tuple[list[str], np.ndarray] | None:
    """(training task names, [tasks, features]): the evaluation-mode routing weights of every training task in
    every routing table of the export, concatenated. None for exports without learned routing."""
    import numpy as np
    from transformers import AutoModelForSeq2SeqLM

    from ..adapters import AdapterConfig, load_adapters, read_export_meta, routing_tables
    from ..engine.monitor import routing_weights

    meta = read_export_meta(export)
    cfg = AdapterConfig.from_dict(meta["adapter"])
    if not cfg.routed or getattr(cfg, "routing", "learned") != "learned":
        return None
    model = AutoModelForSeq2SeqLM.from_pretrained(str(backbone))
    load_adapters(model, export)
    weights = routing_weights(routing_tables(model))
    feats = np.concatenate([w.reshape(w.shape[0], -1).numpy() for _, w in sorted(weights.items())], axis=1)
    return list(meta["tasks"]), feats


def recovery_for(export: Path, backbone: Path, truth_block: dict, out_png: Path, title: str) -> dict | None:
    import numpy as np

    from ..analysis.recovery import plot_recovery, routing_recovery

    found = routing_features(export, backbone)
    if found is None:
        return None
    tasks, learned = found
    skills = truth_block["skills"]
    truth = np.array([[1.0 if s in truth_block["task_skills"][t] else 0.0 for s in skills] for t in tasks])
    rec = routing_recovery(learned, truth, n_perm=1000, seed=0)
    plot_recovery(learned, truth, tasks, skills, out_png, recovery=rec, title=title)
    sim_png = out_png.with_name(out_png.stem + "_similarity.png")
    plot_similarity(learned, truth, tasks, sim_png, f"{title}: score {rec.score:+.2f}")
    return {**rec.to_dict(), "plot": out_png.name, "similarity_plot": sim_png.name, "features": int(learned.shape[1])}


def plot_similarity(learned, truth, tasks: list[str], path: Path, title: str) -> Path:
    """The two task x task cosine-similarity matrices the recovery score correlates, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..figures import save_figure

    def cos(x):
        x = np.asarray(x, dtype=float)
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        return unit @ unit.T

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
    for ax, mat, name in ((axes[0], cos(truth), "true skills shared"), (axes[1], cos(learned), "learned routing")):
        im = ax.imshow(mat, cmap="viridis", interpolation="nearest")
        ax.set_title(f"task x task cosine similarity: {name}", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(tasks, fontsize=5)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    return path


# --- plots -----------------------------------------------------------------------------------------------------


def plot_rows(selected: list[dict], k: int, path: Path, title: str, chance: float | None = None) -> Path | None:
    """One bar per result row at k (and each zero-shot row): the mean over tasks of the test accuracy, per seed
    (dots), median over seeds (bar) and min-max over seeds (line)."""
    rows: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in selected:
        if r["k"] == k or setting(r).startswith("0-shot"):
            rows[r["row"]][r["seed"]].append(100 * r["test"]["accuracy"])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..figures import save_figure

    names = sorted(rows, key=lambda n: ("0-shot" in n, n))
    per_seed = {n: [statistics.mean(v) for _, v in sorted(rows[n].items())] for n in names}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.4))
    for i, n in enumerate(names):
        xs = per_seed[n]
        colour = "C1" if "0-shot" in n else ("C0" if "(full)" in n else "C2")
        ax.barh(i, statistics.median(xs), color=colour, alpha=0.55)
        ax.plot([min(xs), max(xs)], [i, i], color="k", lw=1)
        ax.plot(xs, [i] * len(xs), "k.", ms=3)
    if chance is not None:
        ax.axvline(100 * chance, color="grey", ls="--", lw=1, label=f"chance ({100 * chance:.0f} %)")
        ax.legend(fontsize="x-small", loc="lower right")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("held-out test accuracy (%), mean over tasks; bar: median over seeds, line: min-max, dots: seeds")
    ax.set_title(title, fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_vs_k(selected: list[dict], path: Path, title: str) -> Path | None:
    """Mean over tasks of the median test accuracy over seeds, against k, one line per row (several ks only)."""
    few = [r for r in selected if not setting(r).startswith("0-shot")]
    if len({r["k"] for r in few}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..figures import save_figure

    by_row: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in few:
        by_row[r["row"]][r["k"]][r["task"]].append(100 * r["test"]["accuracy"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, row in enumerate(sorted(by_row)):
        ks = sorted(by_row[row])
        ys = [statistics.mean(statistics.median(v) for v in by_row[row][k].values()) for k in ks]
        ax.plot(ks, ys, marker="o", color=f"C{i % 10}", ls="-" if i < 10 else "--", label=row)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (shots)")
    ax.set_ylabel("test accuracy (%), mean over tasks of the seed median")
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def world_averages(selected: list[dict], seed_world: dict[int, str], tasks: list[str], k: int) -> dict[str, dict]:
    """Per few-shot row at k (and zero-shot row): {world: mean over tasks of the median test accuracy over the
    world's seeds}, and the range across worlds: how much of a result is the world it was drawn in."""
    cells: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in selected:
        if r["k"] == k or setting(r).startswith("0-shot"):
            cells[r["row"]][seed_world[int(r["seed"])]][r["task"]].append(r["test"]["accuracy"])
    out = {}
    for row, by_world in sorted(cells.items()):
        avgs = {
            w: statistics.mean(statistics.median(v) for t, v in per_task.items() if t in tasks)
            for w, per_task in by_world.items()
        }
        out[row] = {"worlds": avgs, "range": max(avgs.values()) - min(avgs.values())}
    return out


def variant_analysis(
    cfg: ReplicateConfig,
    variant: str,
    out: Path,
    res_dir: Path,
    backbone: Path,
    exports: dict[str, Path],
    manifest,
    untrained: dict[str, str] | None = None,
) -> dict:
    """Everything the results page shows for one variant, pooled over the worlds; figures written into
    res_dir. Rows of `untrained` methods (label -> reason) make their claim comparisons untestable."""
    from .stages import world_root

    truth = manifest.extra.get("latent_skills") or {}
    dev_examples = int(truth.get("dev_examples", 0))
    worlds = cfg.world_list()
    results, problems = load_results([world_root(out, w) / "adapt" / variant for w in worlds], dev_examples)
    selected, selection = select_lr(results, cfg.search_seeds())
    tasks = [t for t in manifest.held_out if cfg.adapt.tasks is None or t in cfg.adapt.tasks]
    tabs = tables(selected, tasks)
    untestable = {
        r["row"]: f"{r['label']} did not train ({untrained[r['label']]})"
        for r in selected
        if r["label"] in (untrained or {})
    }
    confusion = answer_confusion(selected, truth, list(manifest.held_out), dev_examples)
    verdicts = claim_verdicts(cfg, selected, untestable)
    spread = {}
    if len(worlds) > 1:
        seed_world = {s: w.name for w in worlds for s in w.seeds}
        spread = {str(k): world_averages(selected, seed_world, tasks, k) for k in cfg.prep.ks}
    figures = variant_figures(selected, tabs, max(cfg.prep.ks), res_dir, variant, truth.get("chance"))
    recovery = routing_recoveries(exports, backbone, truth, res_dir, variant) if truth else {}
    return {
        "variant": variant,
        "jobs": len(results),
        "problems": problems,
        "selection": selection,
        "tables": {str(kk): {name: agg_json(a) for name, a in t.items()} for kk, t in tabs.items()},
        "tables_markdown": {str(kk): {name: table1_markdown(a) for name, a in t.items()} for kk, t in tabs.items()},
        "verdicts": {str(kk): [v.to_dict() for v in vs] for kk, vs in verdicts.items()},
        "_verdicts": verdicts,
        "c7": c7_verdict(recovery),
        "recovery": recovery,
        "figures": figures,
        "chance": truth.get("chance"),
        "answer_confusion": confusion,
        **({"world_spread": spread, "untestable_rows": untestable} if spread or untestable else {}),
    }


def claim_verdicts(cfg: ReplicateConfig, selected: list[dict], untestable: dict) -> dict:
    """{k: the claims file's verdicts on the selected rows at k}; {} without a claims file."""
    verdicts = {}
    claims_path = cfg.claims_path()
    if claims_path is not None:
        from ..analysis.claims import evaluate_claims, load_claims

        claims = load_claims(claims_path)
        for k in cfg.prep.ks:
            verdicts[k] = evaluate_claims(scores_by_row(selected, k), claims, untestable=untestable)
    return verdicts


def variant_figures(selected: list[dict], tabs: dict, k: int, res_dir: Path, variant: str, chance) -> dict:
    """The rows at k, accuracy against k and table 1 at k as PNGs in res_dir: {figure: file name} of those made."""
    figures = {}
    made = plot_rows(
        selected,
        k,
        res_dir / f"{variant}_rows_k{k}.png",
        f"{variant}: held-out test accuracy, k = {k} (zero-shot rows: no shot)",
        chance,
    )
    if made:
        figures["rows"] = made.name
    made = plot_vs_k(selected, res_dir / f"{variant}_accuracy_vs_k.png", f"{variant}: held-out test accuracy")
    if made:
        figures["accuracy_vs_k"] = made.name
    if k in tabs:
        made = plot_accuracy(tabs[k]["table1"], res_dir / f"{variant}_table1_k{k}.png")
        if made:
            figures["table1"] = made.name
    return figures


def routing_recoveries(exports: dict[str, Path], backbone: Path, truth: dict, res_dir: Path, variant: str) -> dict:
    """{label: how well each export's routing recovers the latent skills}; a failure is recorded, not raised."""
    recovery = {}
    for label, export in exports.items():
        try:
            rec = recovery_for(
                export,
                backbone,
                truth,
                res_dir / f"{variant}_recovery_{_slug(label)}.png",
                f"{variant}: {label}, routing after multi-task pretraining",
            )
        except Exception as err:  # noqa: BLE001 - one unreadable export must not lose the other results
            log.warning(f"{variant}/{label}: routing recovery failed: {type(err).__name__}: {err}")
            rec = {"error": f"{type(err).__name__}: {err}"}
        if rec is not None:
            recovery[label] = rec
    return recovery


def answer_confusion(selected: list[dict], truth: dict, held_out: list[str], dev_examples: int) -> dict:
    """What every selected row answered on its test rows (tensorpoly_ds.analysis.answer_confusion); {} without
    the latent-skill ground truth, {"error": ...} if the predictions cannot be read (the rest still publishes)."""
    if not truth:
        return {}
    from ..analysis.answer_confusion import rows_confusion

    try:
        return rows_confusion(selected, truth, held_out, dev_examples)
    except Exception as err:  # noqa: BLE001 - a diagnosis must not lose the results it diagnoses
        log.warning(f"answer confusion failed: {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {err}"}


def c7_verdict(recovery: dict, alpha: float = 0.05) -> dict:
    """C7 per method: 'reproduced' if the learned task similarity tracks the true one better than every
    relabelling of the tasks but a share alpha (one-sided permutation p < alpha, score > null mean),
    'not reproduced' otherwise; overall: reproduced / mixed / not reproduced."""
    per = {}
    for label, r in recovery.items():
        if "error" in r:
            continue
        ok = r["p_value"] < alpha and r["score"] > r["null_mean"]
        per[label] = "reproduced" if ok else "not reproduced"
    if not per:
        return {"status": "missing", "per_method": per}
    vals = set(per.values())
    status = "reproduced" if vals == {"reproduced"} else ("not reproduced" if vals == {"not reproduced"} else "mixed")
    return {"status": status, "per_method": per, "alpha": alpha}


def _slug(text: str) -> str:
    from .stages import slug

    return slug(text)
