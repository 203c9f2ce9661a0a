"""Byte-identical reruns, rerun-is-noop, refusal without --overwrite, few-shot sampling."""

import filecmp
import os

from conftest import emb_args

from data_prep.manifest import load_split, read_manifest


def _files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def test_two_runs_byte_identical(tmp_path, run, emb_dir):
    other = tmp_path / "again"
    assert run(emb_args(other, "--num-proc", "2")) == 0  # num_proc must not change the bytes
    assert _files(emb_dir) == _files(other)
    for rel in _files(emb_dir):
        assert filecmp.cmp(emb_dir / rel, other / rel, shallow=False), rel
    assert read_manifest(emb_dir).content_hash == read_manifest(other).content_hash
    assert any(f.endswith(".arrow") for f in _files(emb_dir))


def test_rerun_is_noop_and_different_args_refuse(tmp_path, run, capsys):
    out = tmp_path / "o"
    assert run(emb_args(out)) == 0
    stamp = os.stat(out / "manifest.json").st_mtime_ns
    capsys.readouterr()
    assert run(emb_args(out)) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert os.stat(out / "manifest.json").st_mtime_ns == stamp
    before = read_manifest(out).content_hash
    assert run(emb_args(out, "--max-input-len", "20")) == 2
    err = capsys.readouterr().err
    assert "different arguments" in err and "max_input_len" in err and "--overwrite" in err
    assert read_manifest(out).content_hash == before
    assert run(emb_args(out, "--max-input-len", "20", "--overwrite")) == 0
    assert read_manifest(out).max_input_len == 20
    from data_prep.pipeline import work_dir

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [work_dir(out).name]
    assert not list(work_dir(out).glob("stage-*")) and not list(work_dir(out).glob("old-*"))


def test_non_manifest_dir_is_not_clobbered(tmp_path, run, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    assert run(emb_args(out)) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "precious.txt").exists()


def test_few_shot_identical_disjoint_and_order_independent(tmp_path, run, emb_dir):
    m = read_manifest(emb_dir)
    assert set(m.few_shot) == set(m.held_out)
    other = tmp_path / "one"
    # Different held-out order and subset: the seed-keyed sample of a task must not change.
    assert run(emb_args(other, "--held-out", ",".join(reversed(m.held_out)))) == 0
    m2 = read_manifest(other)
    for task in m.held_out:
        info = m.few_shot[task]
        assert info["seeds"] == [0, 1024, 42]
        assert info["example_ids"] == m2.few_shot[task]["example_ids"]
        k = info["k"]
        samples = {}
        eval_inputs = {tuple(x) for x in load_split(emb_dir, f"eval/{task}")["input_ids"]}
        for seed in (0, 1024, 42):
            fs = load_split(emb_dir, f"few_shot/{task}/{k}_shot/{seed}_seed")
            assert len(set(fs["example_id"])) == k
            assert len(fs) == k * len(info["templates"])
            assert not ({tuple(x) for x in fs["input_ids"]} & eval_inputs)
            samples[seed] = tuple(info["example_ids"][str(seed)])
        assert len(set(samples.values())) == 3  # the seeds draw different samples
