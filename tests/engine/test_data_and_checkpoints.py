import json
import shutil

import pytest
import torch

from tensorpoly_ds.engine import checkpoint as ckpt
from tensorpoly_ds.engine.data import IGNORE_INDEX, DataError, PreparedData, TrainStream, collate, eval_batches


@pytest.fixture(scope="module")
def rows(prepared_dir):
    data = PreparedData.open(prepared_dir)
    assert len(data.tasks) == 16 and data.vocab_size == 130
    return data.split("train"), data.split("val").select(range(37))


@pytest.mark.parametrize("batching", ["random", "length_grouped"])
def test_step_rows_do_not_depend_on_the_rank_layout(rows, batching):
    train, _ = rows
    one = TrainStream(train, seed=3, micro_batch=4, grad_accum=2, rank=0, world_size=1, batching=batching)
    two = [
        TrainStream(train, seed=3, micro_batch=2, grad_accum=2, rank=r, world_size=2, batching=batching)
        for r in range(2)
    ]
    for _ in range(1700):  # two epochs and a bit (6400 rows / 8 per step)
        a = sorted(i for mb in one.step_indices() for i in mb)
        parts = [[i for mb in s.step_indices() for i in mb] for s in two]
        assert not set(parts[0]) & set(parts[1])  # disjoint shares
        assert sorted(parts[0] + parts[1]) == a  # same global batch
    assert one.epoch == 2 and one.state_dict() == two[0].state_dict()


@pytest.mark.parametrize("batching", ["random", "length_grouped"])
def test_stream_resumes_mid_epoch(rows, batching):
    train, _ = rows
    s = TrainStream(train, seed=1, micro_batch=3, grad_accum=1, batching=batching, group_size=16)
    for _ in range(50):
        s.step_indices()
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.step_indices() for _ in range(60)]
    t = TrainStream(train, seed=1, micro_batch=3, grad_accum=1, batching=batching, group_size=16)
    t.load_state_dict(state)
    assert [t.step_indices() for _ in range(60)] == expected
    with pytest.raises(DataError):
        TrainStream(train.select(range(5)), seed=1, micro_batch=3, grad_accum=1).load_state_dict(state)


def test_collate_pads_and_masks():
    b = collate(
        [
            {"task_id": 1, "input_ids": [5, 6, 7], "target_ids": [8, 1], "extra": "a"},
            {"task_id": 2, "input_ids": [9], "target_ids": [4, 4, 1], "extra": "b"},
        ],
        masked=[False, True],
    )
    assert b["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[8, 1, IGNORE_INDEX], [IGNORE_INDEX] * 3]
    assert b["task_ids"].tolist() == [1, 2] and b["extra"] == ["a", "b"]
    t = collate([{"task_id": 0, "input_ids": [2] * 9, "target_ids": [3, 3, 3, 1]}], max_input_len=4, max_target_len=2)
    assert t["input_ids"].shape == (1, 4) and t["labels"].tolist() == [[3, 1]]  # EOS kept


def test_eval_batches_equal_count_per_rank_and_cover_each_row_once(rows):
    _, val = rows  # 37 rows: not divisible by 2 ranks x batch 4
    per_rank = [list(eval_batches(val, batch_size=4, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 5
    tokens = sum(float((b["labels"] != IGNORE_INDEX).sum()) for bs in per_rank for b in bs)
    single = sum(float((b["labels"] != IGNORE_INDEX).sum()) for b in eval_batches(val, batch_size=4))
    assert tokens == single == float(sum(len(r) for r in val["target_ids"]))


def fake_tag(root, step, files=None):
    tag = root / ckpt.tag_for(step)
    tag.mkdir(parents=True)
    for name, data in (files or {"model.pt": b"x" * 100, "optim.pt": bytes(range(256)) * 64}).items():
        (tag / name).write_bytes(data)
    (tag / ckpt.META).write_text(json.dumps({"step": step}))
    ckpt.write_marker(tag, step)
    return tag


def test_corrupt_or_incomplete_latest_falls_back_with_a_warning(tmp_path):
    good = fake_tag(tmp_path, 10)
    truncated = fake_tag(tmp_path, 20)
    (truncated / "model.pt").write_bytes(b"x" * 10)
    unfinished = fake_tag(tmp_path, 30)
    (unfinished / ckpt.MARKER).unlink()
    with pytest.warns(RuntimeWarning) as record:
        assert ckpt.find_resumable(tmp_path) == good
    text = " ".join(str(w.message) for w in record)
    assert "step_00000030" in text and "marker" in text and "step_00000020" in text and "bytes" in text
    assert ckpt.verify_tag(good) is None


def test_zeroed_block_inside_a_file_of_unchanged_size_is_caught_by_its_checksum(tmp_path):
    """4 KiB zeroed in the middle of an optimizer file: same size, different content (sizes alone pass)."""
    good = fake_tag(tmp_path, 10)
    bad = fake_tag(tmp_path, 20)
    data = bytearray((bad / "optim.pt").read_bytes())
    data[4096:8192] = bytes(4096)
    (bad / "optim.pt").write_bytes(bytes(data))
    assert ckpt.check_structure(bad) is None  # what the size-only check saw
    why = ckpt.verify_tag(bad)
    assert why is not None and "optim.pt" in why and "checksum" in why
    with pytest.warns(RuntimeWarning, match=r"step_00000020.*optim\.pt"):
        assert ckpt.find_resumable(tmp_path) == good
    marker = json.loads((good / ckpt.MARKER).read_text())
    assert set(marker[ckpt.HASH]) == set(marker["files"]) == {"model.pt", "optim.pt", ckpt.META}


def test_no_usable_checkpoint_is_an_error_listing_every_tag(tmp_path):
    """Every kept checkpoint damaged: resume auto refuses (before and at load time) instead of silently
    starting over; interrupted saves alone (no marker) and no checkpoints at all are a fresh start."""
    assert ckpt.find_resumable(tmp_path / "none") is None
    ckpt.precheck(tmp_path / "none", "auto")
    interrupted = fake_tag(tmp_path / "interrupted", 5)
    (interrupted / ckpt.MARKER).unlink()
    with pytest.warns(RuntimeWarning, match="no completion marker"):
        assert ckpt.find_resumable(tmp_path / "interrupted") is None
    ckpt.precheck(tmp_path / "interrupted", "auto")

    root = tmp_path / "damaged"
    for step in (8, 16, 24):
        tag = fake_tag(root, step)
        (tag / "model.pt").write_bytes(b"x" * 50)  # truncated
    zeroed = fake_tag(root, 32)
    (zeroed / "optim.pt").write_bytes(bytes(256 * 64))  # same size, zeroed
    with pytest.raises(ckpt.CheckpointError) as err:
        with pytest.warns(RuntimeWarning):
            ckpt.find_resumable(root)
    text = str(err.value)
    for step in (8, 16, 24):
        assert f"step_{step:08d}: file model.pt has 50 bytes" in text
    assert "step_00000032: file optim.pt: content differs" in text and "--resume none" in text
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):  # sizes: seen before any process group
        shutil.rmtree(zeroed)
        ckpt.precheck(root, "auto")
    ckpt.precheck(root, "none")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory"):
        ckpt.precheck(root, "/no/such/tag")
    with pytest.raises(ckpt.CheckpointError, match="not a usable checkpoint"):
        ckpt.precheck(root, str(root / "step_00000008"))


def test_unreadable_torch_archive_is_named(tmp_path):
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"w": torch.arange(1000.0)}, tag / "ok_model_states.pt")
    torch.save({"w": torch.arange(1000.0)}, tag / "bad_optim_states.pt")
    assert ckpt.unreadable_file(tag) is None
    data = bytearray((tag / "bad_optim_states.pt").read_bytes())
    data[-200:] = bytes(200)  # the zip's central directory
    (tag / "bad_optim_states.pt").write_bytes(bytes(data))
    assert ckpt.unreadable_file(tag).startswith("bad_optim_states.pt")


def test_prune_keeps_the_last_k_complete(tmp_path):
    for s in (1, 2, 3, 4):
        fake_tag(tmp_path, s)
    ckpt.prune(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [3, 4]


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_from_another_adapter_config_is_refused(tmp_path):
    from tensorpoly_ds.adapters import AdapterConfig
    from tensorpoly_ds.engine.trainer import _check_compatible

    saved = {"adapter": AdapterConfig(method="poly", skills=8).to_dict(), "full_finetune": False}
    now = {"adapter": AdapterConfig(method="poly", skills=4, rank=2).to_dict(), "full_finetune": False}
    with pytest.raises(ckpt.CheckpointError) as err:
        _check_compatible(saved, now, tmp_path)
    assert "skills: 8 vs 4" in str(err.value) and "rank: 1 vs 2" in str(err.value)
    with pytest.raises(ckpt.CheckpointError, match="full_finetune"):
        _check_compatible(saved, {"adapter": None, "full_finetune": True}, tmp_path)
    _check_compatible(saved, dict(saved), tmp_path)
