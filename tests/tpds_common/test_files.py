"""Atomic writes: the target is either the old file or the new one, never a half-written one.
Mutations tried: os.replace before the write finishes (the failing writer's target changed: test 2 fails);
no temp cleanup on error (a stray .tmp file remains: test 2 fails)."""

import json

import pytest

from tpds_common.files import atomic_output, atomic_write_json, atomic_write_text, temp_path


def test_writes_replace_the_target_and_create_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert not temp_path(target).exists()
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and not temp_path(target).exists()


def test_json_default_serialises_unknown_types(tmp_path):
    target = tmp_path / "p.json"
    atomic_write_json(target, {"path": tmp_path}, default=str)
    assert json.loads(target.read_text()) == {"path": str(tmp_path)}
