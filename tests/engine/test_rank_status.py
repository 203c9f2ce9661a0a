"""launch/torchrun.py's exit status from the ranks' status files: 124 only when every rank it started
checkpointed and asked to be requeued."""

from launch.torchrun import exit_status
from tensorpoly_ds.engine.rank_status import read_statuses, write_status


def statuses(tmp_path, monkeypatch, *per_rank):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, status in enumerate(per_rank):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        write_status(tmp_path / "run", rank, status, exit_code={"requeue": 124, "done": 0}.get(status, 1))
    return read_statuses(tmp_path / "run" / "status")


def test_every_rank_requeue_maps_torchruns_1_to_124(tmp_path, monkeypatch):
    both = statuses(tmp_path, monkeypatch, "requeue", "requeue")
    assert both[1]["status"] == "requeue" and both[1]["local_rank"] == 1 and both[1]["exit_code"] == 124
    assert exit_status(1, both) == 124
    assert exit_status(0, both) == 0


def test_anything_else_keeps_torchruns_status(tmp_path, monkeypatch):
    assert exit_status(1, statuses(tmp_path / "a", monkeypatch, "requeue", "failed")) == 1
    assert exit_status(1, statuses(tmp_path / "b", monkeypatch, "requeue")) == 1  # rank 1 never reported
    assert exit_status(1, statuses(tmp_path / "c", monkeypatch, "requeue", "running")) == 1
    assert exit_status(1, {}) == 1
