"""`tensorpoly-ds replicate` end to end on the shrunk CI grid: every stage runs for real, the outputs have
the documented structure, a rerun resumes (nothing is redone), another protocol in the same OUT is refused.
The numbers mean nothing at this size and are not checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tensorpoly_ds.replicate.analysis import c7_verdict
from tests.figures import assert_figure

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "configs" / "replicate" / "ci.yaml"


def _run(args, entry="launch.replicate", timeout=600):
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )
    return subprocess.run(
        [sys.executable, "-m", entry, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_ci_grid_end_to_end_then_resume(tmp_path):
    out = tmp_path / "rep"
    # the demo entry point is the same pipeline; it prints the headline table
    first = _run(["--config", str(CI), "--out", str(out)], entry="launch.demo")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "### Table 1 analogue" in first.stdout and "| LoRA | full |" in first.stdout
    res = out / "results"
    body = json.loads((res / "results.json").read_text())
    cfg = yaml.safe_load(CI.read_text())
    variant = cfg["variants"][0]["name"]
    v = body["variants"][variant]
    assert v["problems"] == [] and v["jobs"] > 0
    # every row of the grid has its cell with one value per seed, at every k
    table = v["tables"][str(cfg["prep"]["ks"][0])]["table1"]
    assert set(table["rows"]) == {f"{m['label']} (full)" for m in cfg["methods"]}
    for row in table["rows"].values():
        assert {c["n"] for c in row["cells"].values()} == {len(cfg["prep"]["seeds"])}
    assert set(v["tables"]["0"]["zero_shot"]["rows"])  # zero-shot rows exist
    # one lr chosen per few-shot row from the grid, on dev (zero-shot rows have their one lr)
    few = [s for s in v["selection"] if s["k"] > 0]
    assert few and all(s["chosen_lr"] in cfg["adapt"]["lrs"] and len(s["lrs"]) == len(cfg["adapt"]["lrs"]) for s in few)
    # verdicts for every claim of the claims file, and recovery for the routed export
    assert [c["id"] for c in v["verdicts"][str(cfg["prep"]["ks"][0])]] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    # the verdict stored is the one its recovery numbers give (c7_verdict's outcomes: tests/replicate/test_analysis.py)
    assert v["c7"]["status"] != "missing" and v["c7"] == c7_verdict(v["recovery"], alpha=v["c7"]["alpha"])
    assert {"score", "p_value", "matching"} <= set(v["recovery"]["Poly"])
    assert body["backbone"]["curve"]["train"] and body["backbone"]["curve"]["val"]
    # what every row answered (few-shot and zero-shot), over its test rows, shares summing to one (mutation tried:
    # summary.md without the section fails the heading check below)
    confusion = v["answer_confusion"]
    assert set(confusion) == {s["row"] for s in v["selection"]}
    for by_task in confusion.values():
        assert by_task["all"]["n"] > 0 and sum(by_task["all"]["shares"].values()) == pytest.approx(1.0)
    summary = (res / "summary.md").read_text()
    for heading in (
        "Table 1 analogue",
        "Table 4 analogue",
        "Zero-shot",
        "Claims",
        "Routing recovery",
        "Learning rate per row",
        "Where the time went",
        "What the rows answered",
    ):
        assert heading in summary
    # the rerun finds every stage done, analyses again and publishes the small files
    again = _run(["--config", str(CI), "--out", str(out), "--publish", str(tmp_path / "pub")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to train" in again.stderr and " 0 to run" in again.stderr and "cached" in again.stderr  # log lines
    for name in [
        "summary.md",
        "results.json",
        "backbone_loss.png",
        *v["figures"].values(),
        v["recovery"]["Poly"]["plot"],
        v["recovery"]["Poly"]["similarity_plot"],
    ]:
        assert (res / name).is_file() and (tmp_path / "pub" / name).is_file(), name
        if name.endswith(".png"):
            assert_figure(res / name)
    # another protocol into the same directory is refused before anything runs
    other = tmp_path / "other.yaml"
    other.write_text(
        yaml.safe_dump(
            {
                **cfg,
                "claims": str(CI.parent / cfg["claims"]),
                "adapt": {**cfg["adapt"], "steps": cfg["adapt"]["steps"] + 1},
            }
        )
    )
    refused = _run(["--config", str(other), "--out", str(out)])
    assert refused.returncode == 2 and "another protocol" in refused.stderr
