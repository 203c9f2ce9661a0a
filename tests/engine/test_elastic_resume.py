"""Elastic resume (engine/elastic.py): a checkpoint continued on another number of ranks.

The reference is the source run itself, uninterrupted: the resumed run must reproduce its losses after the
checkpoint. Rows, loss normaliser and update rule do not depend on the world size; only the float summation
order of the gradient reduction does, hence REL. The sources are the session's baseline runs (conftest: the
1-rank ZeRO-0 baseline and its 2-rank ZeRO-2/3 twins), resumed from their step-16 checkpoint.
"""

import json
import shutil

import pytest
import torch

from tensorpoly_ds.engine import checkpoint as ckpt

from .conftest import BASE_STEPS, base_overrides, read_metrics, run_pretrain

AT = 16  # the source's checkpoint the resumed runs start from (saved every 8 steps)
FROM = ckpt.tag_for(AT)
REL = 2e-5  # fp32 on CPU, measured <= 3e-7 relative between 2 -> 1 rank and the uninterrupted 2-rank run


def overrides(backbone, stage: int, world: int, extra=()) -> list[str]:
    """The same global batch (4 x accum 2) on any world size."""
    return base_overrides(backbone, stage=stage, micro=4 // world) + list(extra)


@pytest.fixture(scope="module")
def source(tmp_path_factory, prepared_dir, backbone_dir, baseline_run, two_rank_run):
    """Uninterrupted runs, one per (ZeRO stage, world size): the session's where it has one."""
    runs = {(0, 1): baseline_run}

    def get(stage: int, world: int):
        if (stage, world) not in runs:
            if world == 2:
                runs[stage, world] = two_rank_run(stage)[0]
            else:
                run_dir = tmp_path_factory.mktemp("elastic") / f"z{stage}_w{world}"
                run_pretrain(run_dir, prepared_dir, overrides(backbone_dir, stage, world), nproc=world)
                runs[stage, world] = run_dir
        return runs[stage, world]

    return get


def resume_copy(src, run_dir, prepared, backbone, stage: int, world: int, with_universal: bool = False):
    """Resume a copy of the source's FROM checkpoint (and its universal conversion) on `world` ranks."""
    (run_dir / "checkpoints").mkdir(parents=True)
    names = [FROM] + ([FROM + ckpt.UNIVERSAL_SUFFIX] if with_universal else [])
    for name in names:
        shutil.copytree(src / "checkpoints" / name, run_dir / "checkpoints" / name)
    return run_pretrain(run_dir, prepared, overrides(backbone, stage, world), nproc=world)


def assert_continues(reference, resumed, rel: float = REL):
    expected = {s: v for s, v in read_metrics(reference).items() if s > AT}
    got = read_metrics(resumed)
    assert sorted(got) == list(range(AT + 1, BASE_STEPS + 1))
    for step, value in expected.items():
        assert abs(got[step] - value) <= rel * abs(value), (step, value, got[step])
    val_ref, val = read_metrics(reference, "eval", "val/loss"), read_metrics(resumed, "eval", "val/loss")
    assert sorted(val) == [BASE_STEPS]
    assert abs(val[BASE_STEPS] - val_ref[BASE_STEPS]) <= rel * abs(val_ref[BASE_STEPS]), (val_ref, val)


def reset_adamw_state(universal) -> None:
    """Make the universal checkpoint hold a fresh AdamW state (zero moments, step 0) beside the same weights,
    scheduler and data position; re-mark it so that it is reused, not converted again."""
    for param_dir in (p.parent for p in (universal / "zero").glob("*/exp_avg.pt")):  # not the buffers' folders
        for key in ("exp_avg", "exp_avg_sq"):
            state = torch.load(param_dir / f"{key}.pt", weights_only=False)
            state["param"] = torch.zeros_like(state["param"])
            torch.save(state, param_dir / f"{key}.pt")
        torch.save(torch.zeros(()), param_dir / "step.pt")
    ckpt.write_marker(universal, AT)


@pytest.mark.slow
def test_zero2_two_ranks_to_one_carries_the_optimizer(source, tmp_path, prepared_dir, backbone_dir):
    src = source(2, 2)
    resumed = tmp_path / "resumed"
    proc = resume_copy(src, resumed, prepared_dir, backbone_dir, stage=2, world=1)
    universal = resumed / "checkpoints" / (FROM + ckpt.UNIVERSAL_SUFFIX)
    assert (
        f"resumed from {resumed / 'checkpoints' / FROM} at step {AT} on 1 rank(s) (checkpoint written on "
        f"2 rank(s), converted to a universal checkpoint at {universal})"
    ) in proc.stderr, proc.stderr[-3000:]
    assert ckpt.verify_tag(universal) is None  # its own marker and checksums
    assert not list(resumed.glob("checkpoints/.*tmp*"))
    assert_continues(src, resumed)
    # the moments the resumed run started from are the 2-rank run's: with a fresh AdamW state instead (same
    # weights, scheduler, data) the first step's loss is the same, every later one is not
    fresh = tmp_path / "fresh_optimizer"
    shutil.copytree(resumed / "checkpoints" / FROM, fresh / "checkpoints" / FROM)
    shutil.copytree(universal, fresh / "checkpoints" / universal.name)
    reset_adamw_state(fresh / "checkpoints" / universal.name)
    proc = run_pretrain(fresh, prepared_dir, overrides(backbone_dir, 2, 1), nproc=1)
    assert "converting" not in proc.stderr  # an intact conversion is reused (log lines go to stderr)
    carried, restarted = read_metrics(resumed), read_metrics(fresh)
    assert abs(restarted[AT + 1] - carried[AT + 1]) <= REL * carried[AT + 1]
    assert abs(restarted[AT + 2] - carried[AT + 2]) > 100 * REL * carried[AT + 2], (carried[AT + 2], restarted[AT + 2])


@pytest.mark.slow
@pytest.mark.parametrize("stage,saved_on,resumed_on", [(2, 1, 2), (3, 2, 1), (0, 1, 2)])
def test_resume_on_another_world_size(stage, saved_on, resumed_on, source, tmp_path, prepared_dir, backbone_dir):
    """ZeRO-3 has partitioned parameters too, and needs elastic.repair_after_universal_load (without it the
    losses drift from the second step after the resume on, 2e-5 relative and growing); ZeRO-0 is not sharded."""
    src = source(stage, saved_on)
    resumed = tmp_path / "resumed"
    proc = resume_copy(src, resumed, prepared_dir, backbone_dir, stage=stage, world=resumed_on)
    how = (
        "its optimizer state is not sharded, loaded as it is"
        if stage == 0
        else "converted to a universal checkpoint at"
    )
    assert (
        f"on {resumed_on} rank(s) (checkpoint written on {saved_on} rank(s){';' if stage == 0 else ','} {how}"
        in proc.stderr
    ), proc.stderr[-3000:]
    converted = list((resumed / "checkpoints").glob(f"*{ckpt.UNIVERSAL_SUFFIX}"))
    assert len(converted) == (0 if stage == 0 else 1)
    assert_continues(src, resumed)
    # the checkpoints written after the resume are ordinary ones of the new world size
    assert (
        json.loads((resumed / "checkpoints" / ckpt.tag_for(BASE_STEPS) / ckpt.META).read_text())["world_size"]
        == resumed_on
    )


def fake_tag(run_dir, meta: dict, files: dict[str, bytes], step: int = AT):
    """A structurally complete tag (marker with sizes): enough for the checks made before any process group."""
    tag = run_dir / "checkpoints" / ckpt.tag_for(step)
    tag.mkdir(parents=True)
    for name, body in files.items():
        (tag / name).write_bytes(body)
    (tag / ckpt.META).write_text(json.dumps({"step": step, **meta}))
    sizes = {p.name: p.stat().st_size for p in tag.iterdir()}
    (tag / ckpt.MARKER).write_text(json.dumps({"step": step, "files": sizes}))
    return tag


ZERO_FILES = {
    "mp_rank_00_model_states.pt": b"x",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"x",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"x",
}
TWO_RANKS = {"world_size": 2, "batch": {"micro_batch": 2, "grad_accum": 2, "world_size": 2, "global_batch": 8}}


def test_another_global_batch_is_refused_before_starting(tmp_path, prepared_dir, backbone_dir):
    fake_tag(tmp_path, TWO_RANKS, ZERO_FILES)
    proc = run_pretrain(tmp_path, prepared_dir, overrides(backbone_dir, 2, 1, ["train.micro_batch=2"]), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "global batch of 8 (micro 2 x accum 2 x 2 ranks), this run has 4 (micro 2 x accum 2 x 1 rank)" in proc.stderr
        and "set train.micro_batch x train.grad_accum = 8" in proc.stderr
    ), proc.stderr[-2000:]


def test_adafactor_across_world_sizes_is_refused_before_starting(tmp_path, prepared_dir, backbone_dir):
    fake_tag(tmp_path, TWO_RANKS, ZERO_FILES)
    proc = run_pretrain(tmp_path, prepared_dir, overrides(backbone_dir, 2, 1, ["optim.name=adafactor"]), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "written on 2 rank(s), this run has 1" in proc.stderr and "Adafactor" in proc.stderr
    assert "optim.name=adamw" in proc.stderr and "--export-only" in proc.stderr


def test_pruning_a_tag_removes_its_conversion(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (4, 8):
        fake_tag(tmp_path, {"world_size": 1}, {"mp_rank_00_model_states.pt": b"x"}, step=step)
        (ckpt_dir / (ckpt.tag_for(step) + ckpt.UNIVERSAL_SUFFIX)).mkdir()
    (ckpt_dir / f".{ckpt.tag_for(4)}{ckpt.UNIVERSAL_SUFFIX}.tmp").mkdir()  # a conversion cut short
    ckpt.prune(ckpt_dir, keep=1)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [ckpt.tag_for(8), ckpt.tag_for(8) + ckpt.UNIVERSAL_SUFFIX]
