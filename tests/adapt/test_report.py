"""The report from a folder of synthetic result files, some missing, failed or incomplete."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from launch import report as report_cli
from tensorpoly_ds.adapt.table import write_table
from tests.figures import assert_figure

TASKS = ["anli_r1", "cb", "rte"]
SEEDS = [0, 1024, 42]
ROWS = [("LoRA", "full"), ("Poly", "full"), ("Poly", "z"), ("Poly", "mu")]


def write_result(d: Path, label, mode, task, seed, acc, *, status="complete", marker=True, routing=False):
    d.mkdir(parents=True, exist_ok=True)
    job = {"label": label, "mode": mode, "task": task, "seed": seed, "k": 32, "out_dir": str(d)}
    (d / "job.json").write_text(json.dumps(job))
    if status is None:
        return job
    body = {"status": status, "job": job}
    if status == "complete":
        body.update(
            label=label,
            mode=mode,
            task=task,
            seed=seed,
            k=32,
            final={"step": 10, "accuracy": acc},
            best={"step": 5, "accuracy": min(1.0, acc + 0.01)},
            params={
                "trainable": {"full": 1000, "z": 24, "mu": 976}[mode] if label == "Poly" else 500,
                "multi_task": {"modules": 976, "routing": 240, "total": 1216} if label == "Poly" else None,
            },
            routing_file="routing.safetensors" if routing else None,
        )
        if routing:
            save_file(
                {
                    "encoder__block__0.weights": torch.tensor([[0.2, 0.8]]),
                    "encoder__block__0.logits": torch.tensor([[0.0, 1.0]]),
                    "decoder__block__0.weights": torch.tensor([[0.5, 0.5]]),
                    "decoder__block__0.logits": torch.tensor([[0.0, 0.0]]),
                },
                str(d / "routing.safetensors"),
            )
    else:
        body["error"] = "RuntimeError: out of memory"
    (d / "result.json").write_text(json.dumps(body))
    if marker and status == "complete":
        (d / "COMPLETE").write_text("complete\n")
    return job


@pytest.fixture()
def runs(tmp_path):
    rng = random.Random(0)
    sweep = tmp_path / "sweep"
    expected = {}  # (label, mode, task) -> list of accuracies of complete jobs
    problems = {}
    table_rows = []
    for label, mode in ROWS:
        for task in TASKS:
            for seed in SEEDS:
                d = sweep / "jobs" / f"{label}_{mode}_{task}_{seed}"
                acc = round(rng.uniform(0.3, 0.9), 4)
                key = (label, mode, task, seed)
                job = {"label": label, "mode": mode, "task": task, "seed": seed, "out_dir": str(d)}
                table_rows.append({"row": len(table_rows), "id": d.name, "job": job})
                if key == ("Poly", "z", "cb", 42):
                    problems[str(d)] = "missing"  # never ran: only the job table knows it
                    continue
                if key == ("Poly", "mu", "rte", 0):
                    write_result(d, label, mode, task, seed, acc, status="failed")
                    problems[str(d)] = "failed"
                    continue
                if key == ("Poly", "mu", "rte", 1024):
                    write_result(d, label, mode, task, seed, acc, status=None)  # crashed: job.json only
                    problems[str(d)] = "incomplete"
                    continue
                if key == ("LoRA", "full", "anli_r1", 42):
                    write_result(d, label, mode, task, seed, acc, marker=False)  # killed before the marker
                    problems[str(d)] = "incomplete"
                    continue
                write_result(d, label, mode, task, seed, acc, routing=(label == "Poly" and mode != "mu"))
                expected.setdefault((label, mode, task), []).append(100 * acc)
    write_table(sweep / "jobs.jsonl", table_rows)
    # zero-shot results of the same method and mode: a separate row, never mixed with the few-shot seeds
    zs = {}
    for task in TASKS:
        for seed in SEEDS:
            d = tmp_path / "zeroshot" / f"{task}_{seed}"
            write_result(d, "Poly", "mu", task, seed, 0.1 + 0.01 * seed % 7)
            body = json.loads((d / "result.json").read_text())
            body.update(k=0, zero_shot=True)
            (d / "result.json").write_text(json.dumps(body))
            zs.setdefault(("Poly", "mu (0-shot)", task), []).append(100 * (0.1 + 0.01 * seed % 7))
    expected.update(zs)
    # a second run directory with an unreadable result
    bad = tmp_path / "other" / "broken"
    bad.mkdir(parents=True)
    (bad / "result.json").write_text("{not json")
    problems[str(bad)] = "broken"
    return tmp_path, expected, problems


def test_report_cells_match_medians_and_problems_are_listed(runs, capsys):
    root, expected, problems = runs
    out = root / "report"
    assert report_cli.main([str(root / "sweep"), str(root / "other"), str(root / "zeroshot"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for d, state in problems.items():
        assert f"{state}: {d}" in err
    # every cell of the CSV against a median computed here
    with open(out / "table1.csv") as f:
        cells = list(csv.DictReader(f))
    seen = set()
    for c in cells:
        key = (c["method"], c["mode"], c["task"])
        if c["task"] == "avg":
            continue
        seen.add(key)
        xs = expected[key]
        assert float(c["median"]) == pytest.approx(np.median(xs), abs=1e-3)
        assert float(c["min"]) == pytest.approx(min(xs), abs=1e-3)
        assert float(c["max"]) == pytest.approx(max(xs), abs=1e-3)
        assert float(c["q1"]) == pytest.approx(np.percentile(xs, 25), abs=1e-3)
        assert int(c["n"]) == len(xs)
    assert seen == set(expected)
    for label, mode in ROWS + [("Poly", "mu (0-shot)")]:
        avg = next(c for c in cells if (c["method"], c["mode"], c["task"]) == (label, mode, "avg"))
        assert float(avg["median"]) == pytest.approx(
            np.mean([np.median(expected[(label, mode, t)]) for t in TASKS]), abs=1e-3
        )
    # Markdown: one row per (method, mode), the task columns plus Avg, the spread and n in each cell
    md = (out / "table1.md").read_text().splitlines()
    assert md[0] == "| Method | Mode | " + " | ".join(TASKS) + " | Avg |"
    poly_z = next(line for line in md if line.startswith("| Poly | z |"))
    xs = expected[("Poly", "z", "cb")]
    assert f"{np.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f}, n=2)" in poly_z
    assert len(md) == 2 + len(ROWS) + 1
    assert [line.split(" | ")[1] for line in md[2:]] == ["full", "full", "z", "mu", "mu (0-shot)"]
    report = (out / "report.md").read_text()
    for d, state in problems.items():
        assert d in report
    assert report.count("| missing |") == 1 and report.count("| failed |") == 1
    assert report.count("| incomplete |") == 2 and report.count("| broken |") == 1
    # parameter table
    params = (out / "params.md").read_text()
    assert "| Poly | 1,216 | 976 | 240 | 1,000 | 24 | 976 |" in params
    assert "| LoRA | — | — | — | 500 | — | — |" in params
    # plots
    for name in ("accuracy.png", "routing_Poly_full.png", "routing_Poly_z.png"):
        assert_figure(out / name)
    assert not (out / "routing_Poly_mu.png").exists()
    assert (
        report_cli.main(
            [str(root / "sweep"), "--out", str(root / "r2"), "--strict", "--no-plots", "--tasks", "rte,anli_r1"]
        )
        == 1
    )
    assert (root / "r2" / "table1.md").read_text().splitlines()[0] == "| Method | Mode | rte | anli_r1 | cb | Avg |"


def test_report_iqr_best_metric_and_empty(tmp_path, capsys):
    for seed, acc in zip(SEEDS, [0.5, 0.7, 0.6]):
        write_result(tmp_path / "runs" / str(seed), "TLoRA", "full", "rte", seed, acc)
    assert (
        report_cli.main([str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--metric", "best", "--spread", "iqr"])
        == 0
    )
    line = next(l for l in (tmp_path / "r" / "table1.md").read_text().splitlines() if l.startswith("| TLoRA"))
    best = [51.0, 71.0, 61.0]
    assert f"{np.median(best):.1f} ({np.percentile(best, 25):.1f}–{np.percentile(best, 75):.1f}, n=3)" in line
    # nothing at all: still a report, no crash
    assert report_cli.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "r3")]) == 0
    assert "missing" in capsys.readouterr().err
    assert (tmp_path / "r3" / "report.md").exists()


def test_mean_aggregate_cells_and_average_against_numpy(runs):
    """--aggregate mean (MHR's tables): every cell is mean ± sample std over seeds; the average is the mean of
    the task means ± the std over seeds of the per-seed average; --metric best reads the best evaluation."""
    root, _, _ = runs
    out = root / "mean"
    assert (
        report_cli.main(
            [str(root / "sweep"), "--out", str(out), "--aggregate", "mean", "--metric", "best", "--no-plots"]
        )
        == 0
    )
    best: dict[tuple, dict[int, float]] = {}  # (label, mode, task) -> seed -> best accuracy (%), read here
    for path in (root / "sweep").rglob("COMPLETE"):
        r = json.loads((path.parent / "result.json").read_text())
        best.setdefault((r["label"], r["mode"], r["task"]), {})[r["seed"]] = 100 * r["best"]["accuracy"]
    with open(out / "table1.csv") as f:
        cells = {(c["method"], c["mode"], c["task"]): c for c in csv.DictReader(f)}
    md = {"|".join(line.split(" | ")[:2])[2:]: line for line in (out / "table1.md").read_text().splitlines()[2:]}
    for (label, mode, task), by_seed in best.items():
        xs = list(by_seed.values())
        c = cells[(label, mode, task)]
        assert float(c["mean"]) == pytest.approx(np.mean(xs), abs=1e-3)
        assert float(c["median"]) == pytest.approx(np.median(xs), abs=1e-3)
        if len(xs) > 1:
            assert float(c["std"]) == pytest.approx(np.std(xs, ddof=1), abs=1e-3)
            assert f"{np.mean(xs):.1f} ± {np.std(xs, ddof=1):.1f} (n={len(xs)})" in md[f"{label}|{mode}"]
        else:
            assert c["std"] == "" and f"{np.mean(xs):.1f} (n=1)" in md[f"{label}|{mode}"]
    for label, mode in ROWS:
        avg = cells[(label, mode, "avg")]
        mean = np.mean([np.mean(list(best[(label, mode, t)].values())) for t in TASKS])
        assert float(avg["mean"]) == pytest.approx(mean, abs=1e-3)
        common = sorted(set.intersection(*(set(best[(label, mode, t)]) for t in TASKS)))
        per_seed = [np.mean([best[(label, mode, t)][s] for t in TASKS]) for s in common]
        if len(common) >= 2:
            assert float(avg["std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-3)
            assert md[f"{label}|{mode}"].endswith(f"| {mean:.1f} ± {np.std(per_seed, ddof=1):.1f} |")
        else:  # Poly mu: rte has only seed 42, so no spread of the average
            assert avg["std"] == "" and md[f"{label}|{mode}"].endswith(f"| {mean:.1f} |")
    assert "mean accuracy (%) over seeds of the **best** evaluation" in (out / "report.md").read_text()
