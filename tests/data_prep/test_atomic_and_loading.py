"""Interrupted builds leave nothing half-written; manifest validation; loading by rank."""

import json

import pytest
from conftest import emb_args

import data_prep.pipeline as pl
from data_prep.cli import main
from data_prep.manifest import ManifestError, load_split, read_manifest, shard_range


def _interrupt_after_first_write(monkeypatch):
    real = pl.write_split
    calls = []

    def flaky(root, rel, *a, **kw):
        calls.append(rel)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption mid-write")
        return real(root, rel, *a, **kw)

    monkeypatch.setattr(pl, "write_split", flaky)
    return calls


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_interrupted_fresh_build_leaves_no_dir(tmp_path, run, monkeypatch):
    calls = _interrupt_after_first_write(monkeypatch)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):  # main itself: `run` maps Ctrl-C to exit 130 as the CLI does
        main(emb_args(out))
    assert calls == ["train", "val"]
    assert not out.exists()
    work = pl.work_dir(out)
    assert [p.name for p in tmp_path.iterdir()] == [work.name]  # only the work folder: lock + part cache
    assert not list(work.glob("stage-*"))  # staging folder cleaned up
    assert len(list((work / "parts").iterdir())) == 19  # every part survived for the rerun


def test_interrupted_overwrite_keeps_previous_dir(tmp_path, run, monkeypatch):
    out = tmp_path / "o"
    assert run(emb_args(out)) == 0
    before = _files(out)
    _interrupt_after_first_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(emb_args(out, "--max-input-len", "12", "--overwrite"))
    assert _files(out) == before
    assert read_manifest(out).max_input_len == 256
    assert sorted(p.name for p in tmp_path.iterdir()) == [pl.work_dir(out).name, "o"]


def test_resumed_build_equals_uninterrupted(tmp_path, monkeypatch):
    """A crash after some parts: the rerun builds only the rest, and the result is byte-identical
    to a build that was never interrupted."""
    real_run = pl.Worker.run
    seen = []

    def crash_after_five(self, job):
        if len(seen) == 5:
            raise KeyboardInterrupt("simulated crash")
        seen.append(job.name)
        return real_run(self, job)

    cfg = lambda out, **kw: pl.PrepConfig(
        "embedded", "embedded", "embedded", out, cap_per_template="40", val_per_template=10, num_shards=3, **kw
    )
    monkeypatch.setattr(pl.Worker, "run", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        pl.build(cfg(tmp_path / "a"))
    monkeypatch.setattr(pl.Worker, "run", real_run)
    resumed = pl.build(cfg(tmp_path / "a"))
    assert (resumed.parts_reused, resumed.parts_built) == (5, 14)
    clean = pl.build(cfg(tmp_path / "b"))
    assert clean.parts_reused == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and resumed.manifest.content_hash == clean.manifest.content_hash


def test_load_split_by_rank(emb_dir):
    full = load_split(emb_dir, "train")
    assert full.cache_files and all(f["filename"].startswith(str(emb_dir)) for f in full.cache_files)  # mmap
    a, b = load_split(emb_dir, "train", 0, 2), load_split(emb_dir, "train", 1, 2)
    assert len(a) + len(b) == len(full) and abs(len(a) - len(b)) <= 1
    rows = lambda d: [(r["task_id"], tuple(r["input_ids"]), tuple(r["target_ids"])) for r in d]
    assert rows(a) + rows(b) == rows(full)  # contiguous, disjoint, complete
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
    body["format_version"] = 3
    (d / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match=r"manifest.json: field 'format_version' is 3"):
        read_manifest(d)
    body["format_version"] = 2
    del body["tasks"]
    (d / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match=r"manifest.json: missing field 'tasks'"):
        read_manifest(d)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path)
