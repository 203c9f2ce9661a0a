"""Per-task overrides in sweep grids: applied to that task's rows only, refused with the grid file and key
when the task or the field is unknown."""

import pytest

from tensorpoly_ds.adapt.spec import JobError
from tensorpoly_ds.adapt.table import TableError, expand_grid


def grid(**extra):
    return {
        "base": {"data_dir": "data", "steps": 10, "batch_size": 8},
        "methods": [{"label": "LoRA", "method": "lora"}, {"label": "FullFT", "method": "fullft", "batch_size": 2}],
        "modes": ["full"],
        "tasks": ["rte", "h-swag"],
        "seeds": [0, 1],
        **extra,
    }


def test_overrides_apply_to_the_task_rows_only(tmp_path):
    plain = expand_grid(grid(), tmp_path)
    rows = expand_grid(grid(overrides={"h-swag": {"batch_size": 4, "grad_accum": 2}}), tmp_path)
    assert len(rows) == len(plain) == 8
    for before, after in zip(plain, rows):
        job = after["job"]
        assert after["id"] == before["id"]
        if job["task"] == "h-swag":
            assert (job["batch_size"], job["grad_accum"]) == (4, 2)  # wins over base and the method entry
            assert {k: v for k, v in job.items() if k not in ("batch_size", "grad_accum")} == {
                k: v for k, v in before["job"].items() if k not in ("batch_size", "grad_accum")
            }
        else:
            assert job == before["job"]
    assert [r["job"]["batch_size"] for r in rows if r["job"]["task"] == "rte"] == [8, 8, 2, 2]


def test_a_held_out_task_missing_from_this_grid_is_not_an_error(tmp_path):
    rows = expand_grid(grid(tasks=["rte"], overrides={"h-swag": {"batch_size": 4}}), tmp_path)
    assert all(r["job"]["batch_size"] in (8, 2) for r in rows)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hellaswag": {"batch_size": 4}}, r"grid\.yaml: overrides\.hellaswag: unknown task 'hellaswag'"),
        ({"h-swag": {"batch_sise": 4}}, r"grid\.yaml: overrides\.h-swag\.batch_sise: not a job field"),
        ({"h-swag": {"seed": 3}}, r"grid\.yaml: overrides\.h-swag\.seed: not a job field an override can set"),
        ({"h-swag": 4}, r"grid\.yaml: overrides\.h-swag must map job fields"),
        (["h-swag"], r"grid\.yaml: 'overrides' must map task names"),
    ],
)
def test_bad_overrides_name_the_grid_file_and_key(tmp_path, overrides, match):
    with pytest.raises(TableError, match=match):
        expand_grid(grid(overrides=overrides), tmp_path, source="configs/sweep/grid.yaml")


def test_override_values_are_validated_as_job_fields(tmp_path):
    with pytest.raises(JobError, match=r"job field 'batch_size' = 0: must be >= 1"):
        expand_grid(grid(overrides={"h-swag": {"batch_size": 0}}), tmp_path)
