"""Protocol v2 end to end at toy size (configs/replicate/ci_v2.yaml): three worlds, Poly's pretraining lr chosen
by the search (with its edge rule) in w0 and reused in w1 and w2, LoRA on a method-level recipe, the adaptation
edge rule, pooled verdicts and the world spread. The numbers mean nothing at this size; the structure and the
rules' consistency with the numbers are checked. Mutation seen caught: phase 2 skipping rows whose chosen lr was
an edge-rule extension (w1 and w2 then lacked those rows: the pair count below failed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CI_V2 = ROOT / "configs" / "replicate" / "ci_v2.yaml"


@pytest.mark.slow
def test_v2_protocol_end_to_end(tmp_path):
    out = tmp_path / "v2"
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    )
    done = subprocess.run(
        [sys.executable, "-m", "launch.replicate", "--config", str(CI_V2), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = yaml.safe_load(CI_V2.read_text())
    worlds = [w["name"] for w in cfg["worlds"]]
    search = json.loads((out / "worlds" / "w0" / "lr_search" / "noprompt" / "Poly" / "lr_search.json").read_text())
    axis = search["axes"][0]
    assert axis["key"] == "module_lr" and axis["chosen"] == search["chosen"]["module_lr"]
    losses = {float(k): v for k, v in axis["losses"].items()}
    assert set(cfg["pretrain"]["lr_search"]["module_lrs"]) <= set(losses)
    assert axis["chosen"] == min(sorted(losses), key=lambda x: losses[x])  # the rule, on the real losses
    # a two-value grid always chooses an edge: extended once (max_extensions 1), then the edge is reported
    assert len(axis["extended"]) == 1 and len(losses) == 3
    assert axis["edge"] == {min(losses): "low", max(losses): "high"}.get(axis["chosen"])
    v = json.loads((out / "results" / "results.json").read_text())["variants"]["noprompt"]
    table = v["pretraining"]["methods"]
    assert set(table) == {"LoRA", "Poly"} and all(set(e["val_loss"]) == set(worlds) for e in table.values())
    assert "search" in table["Poly"] and "search" not in table["LoRA"]
    # every world's Poly run trained at the chosen lr; w0's run is the chosen candidate itself
    for w in worlds[1:]:
        run = yaml.safe_load((out / "worlds" / w / "pretrain" / "noprompt" / "Poly" / "run.yaml").read_text())
        assert run["optim"]["module_lr"] == axis["chosen"] and run["train"]["seed"] != 42
    limit = cfg["pretrain"]["untrained_factor"] * table["Poly"]["mean_val_loss"]
    assert set(v["pretraining"]["did_not_train"]) == {k for k, e in table.items() if e["mean_val_loss"] > limit}
    # the adaptation lr: chosen among the grid and its extensions, the same for every world's jobs
    for s in v["selection"]:
        if s["k"] > 0:
            assert float(s["chosen_lr"]) in {float(x) for x in s["lrs"]}
    # verdicts pair over tasks x seeds x worlds: one task, one seed per world
    c1 = next(c for c in v["verdicts"]["4"] if c["id"] == "C1")
    poly_vs_lora = next(c for c in c1["comparisons"] if c["a"] == "Poly (full)" and c["b"] == "LoRA (full)")
    assert poly_vs_lora["verdict"]["n_pairs"] == 3
    spread = v["world_spread"]["4"]
    assert set(spread) >= {"Poly (full)", "Poly (z)", "LoRA (full)", "FullFT (full)"}
    assert all(set(e["worlds"]) == set(worlds) for e in spread.values())
    # the sensitivity check: every module-lr candidate adapted; each rule's choice follows from the table
    sens = v["pretraining"]["sensitivity"]["Poly"]
    cands = sens["candidates"]
    assert set(cands) == set(axis["losses"]) and all(c["jobs"] == 1 for c in cands.values())
    assert sens["chosen_by_val_loss"] == f"{axis['chosen']:g}"
    assert sens["chosen_by_dev"] == max(sorted(cands, key=float), key=lambda x: cands[x]["dev"])
    assert sens["agree"] == (sens["chosen_by_dev"] == sens["chosen_by_val_loss"])
    summary = (out / "results" / "summary.md").read_text()
    assert "Spread across worlds" in summary and "learning rates (chosen on validation loss)" in summary
    assert "what dev accuracy would have chosen" in summary
