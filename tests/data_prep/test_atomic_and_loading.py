"""Interrupted builds leave nothing half-written; manifest validation; loading by rank."""
import json

import pytest

import data_prep.pipeline as pl
from data_prep.manifest import ManifestError, load_split, read_manifest, shard_range

from conftest import emb_args


def _interrupt_after_first_save(monkeypatch):
    real = pl.save_split
    calls = []

    def flaky(*a, **kw):
        calls.append(a[2])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption mid-write")
        return real(*a, **kw)
    monkeypatch.setattr(pl, "save_split", flaky)
    return calls


def test_interrupted_fresh_build_leaves_no_dir(tmp_path, run, monkeypatch):
    calls = _interrupt_after_first_save(monkeypatch)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        run(emb_args(out))
    assert calls == ["train", "val"]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []   # staging folder cleaned up


def test_interrupted_overwrite_keeps_previous_dir(tmp_path, run, monkeypatch):
    out = tmp_path / "o"
    assert run(emb_args(out)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _interrupt_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(emb_args(out, "--max-input-len", "12", "--overwrite"))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert read_manifest(out).max_input_len == 256
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_load_split_by_rank(emb_dir):
    full = load_split(emb_dir, "train")
    assert full.cache_files and all(f["filename"].startswith(str(emb_dir)) for f in full.cache_files)  # mmap
    a, b = load_split(emb_dir, "train", 0, 2), load_split(emb_dir, "train", 1, 2)
    assert len(a) + len(b) == len(full) and abs(len(a) - len(b)) <= 1
    rows = lambda d: [(r["task_id"], tuple(r["input_ids"]), tuple(r["target_ids"])) for r in d]
    assert rows(a) + rows(b) == rows(full)   # contiguous, disjoint, complete
    assert [list(shard_range(5, r, 3)) for r in range(3)] == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError):
        load_split(emb_dir, "train", 2, 2)
    with pytest.raises(KeyError, match="valid splits: train, val"):
        load_split(emb_dir, "test")
    m = read_manifest(emb_dir)
    assert len(m.tasks) == 16 and set(full.unique("task_id")) == set(range(16))
    assert all(m.tasks[i] == n for i, n in zip(full["task_id"][:50], full["task_name"][:50]))


def test_manifest_validation(tmp_path, emb_dir):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(emb_dir, d)
    body = json.loads((d / "manifest.json").read_text())
    body["format_version"] = 2
    (d / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match=r"manifest.json: field 'format_version' is 2"):
        read_manifest(d)
    body["format_version"] = 1
    del body["tasks"]
    (d / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match=r"manifest.json: missing field 'tasks'"):
        read_manifest(d)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path)
