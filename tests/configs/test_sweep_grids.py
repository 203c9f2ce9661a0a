"""Shipped sweep grids name only real job fields and real modes (a typo would only surface on the cluster)."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from data_prep.mixture import load_t0_tasks
from tensorpoly_ds.adapt.job import AdaptJob
from tensorpoly_ds.adapters import MODES

GRIDS = sorted((Path(__file__).resolve().parents[2] / "configs" / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_grid_fields_are_job_fields(path):
    grid = yaml.safe_load(path.read_text())
    fields = {f.name for f in dataclasses.fields(AdaptJob)}
    assert set(grid["base"]) <= fields, set(grid["base"]) - fields
    for method in grid["methods"]:
        assert set(method) - {"label"} <= fields, method
        assert ("export" in method) != ("method" in method), method
    assert set(grid["modes"]) <= set(MODES)
    assert grid["seeds"] == [0, 1024, 42]
    held_out = {t["task"] for t in load_t0_tasks()["held_out_eval"]}
    for task, values in (grid.get("overrides") or {}).items():
        assert task in held_out, task
        assert set(values) <= fields, values


def test_t0_3b_grid_runs_hellaswag_with_the_reference_batch(tmp_path):
    """The reference recipe adapts HellaSwag with batch 4 x accumulation 2, every other task with batch 8."""
    from tensorpoly_ds.adapt.table import expand_grid

    path = next(p for p in GRIDS if p.name == "t0_3b.yaml")
    grid = yaml.safe_load(path.read_text())
    grid["methods"] = [m for m in grid["methods"] if "method" in m]  # no pretrained exports needed
    grid["tasks"] = sorted({t["task"] for t in load_t0_tasks()["held_out_eval"]})
    rows = expand_grid(grid, tmp_path, source=str(path))
    recipe = {(r["job"]["task"] == "h-swag", r["job"]["batch_size"], r["job"]["grad_accum"]) for r in rows}
    assert recipe == {(True, 4, 2), (False, 8, 1)}


def test_there_is_a_grid():
    assert GRIDS
