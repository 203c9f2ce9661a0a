"""Shipped sweep grids name only real job fields and real modes (a typo would only surface on the cluster)."""

import dataclasses
from pathlib import Path

import pytest
import yaml

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


def test_there_is_a_grid():
    assert GRIDS
