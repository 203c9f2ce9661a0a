"""`tensorpoly-ds adapt --set FIELD=VALUE` is the dotted override of every config: YAML values (JSON too),
dotted fields into mapping fields, unknown fields and wrong types refused before anything runs."""

import pytest

from launch.adapt import build_parser, resolve_job
from tensorpoly_ds.adapt.spec import JobError

BASE = ["--method", "lora", "--task", "t", "--data", "D", "--out", "O"]


def _job(*sets):
    return resolve_job(build_parser().parse_args(BASE + [x for s in sets for x in ("--set", s)]))


def test_json_and_yaml_values_and_dotted_fields():
    """Mutation seen caught: the dotted key taken as one field name ('adapter.rank' refused as unknown)."""
    job = _job(
        'trainer="engine"',
        "lr=1e-3",
        'adapter={"rank": 2}',
        "adapter.skills=4",
        "label=Poly x",
        "k=null",
        "collapse=true",
    )
    assert (job.trainer, job.lr, job.adapter, job.label, job.k, job.collapse) == (
        "engine",
        1e-3,
        {"rank": 2, "skills": 4},
        "Poly x",
        None,
        True,
    )
    assert isinstance(job.lr, float)


@pytest.mark.parametrize(
    "items, message",
    [
        (["stepz=3"], r"command line: unknown job field\(s\) \['stepz'\]"),
        (["steps=many"], r"command line: key 'steps' = 'many': expected an integer, got str"),
        (["lr=yes"], r"key 'lr' = 'yes': expected a number"),  # YAML 1.1 would have read True
        (["steps"], r"override 'steps': expected key=value"),
        (["steps=3", "steps.x=1"], r"--set 'steps.x=1': steps.x: 'steps' is not a section"),
    ],
)
def test_bad_overrides_are_refused_naming_the_field(items, message):
    """Mutation seen caught: AdaptJob.from_dict without check_fields (steps='many' and lr='yes' accepted)."""
    with pytest.raises(JobError, match=message):
        _job(*items)


def test_sweep_grid_takes_dotted_overrides(tmp_path):
    """`tensorpoly-ds sweep --grid g.yaml base.steps=3 seeds=[7]`. Mutation seen caught: the overrides not
    applied to the grid (steps 1000, seeds 0, 1024, 42)."""
    import json

    import yaml

    from launch.sweep import main

    grid = tmp_path / "g.yaml"
    grid.write_text(
        yaml.safe_dump({"base": {"data_dir": "d"}, "methods": [{"label": "F", "method": "fullft"}], "tasks": ["t"]})
    )
    assert main(["--grid", str(grid), "--out", str(tmp_path / "o"), "--expand-only", "base.steps=3", "seeds=[7]"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "jobs.jsonl").read_text().splitlines()]
    assert [(r["job"]["steps"], r["job"]["seed"]) for r in rows] == [(3, 7)]
