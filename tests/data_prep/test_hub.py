"""`--source hub` and `--source local:SNAPSHOT` against a faithful local replica of bigscience/P3:
README card metadata, Parquet configs, the original TFRecord layout and the loading script."""

import datasets
import pytest
from conftest import HELD, TRAIN_CONFIGS, p3_rows, rte_configs

from data_prep import sources
from data_prep.errors import ConfigError, DataError
from data_prep.manifest import load_split, load_tokenizer, read_manifest
from data_prep.p3_replica import write_replica
from data_prep.pipeline import PrepConfig, build, plan


def _store():
    store = {
        TRAIN_CONFIGS[0]: {"train": p3_rows(TRAIN_CONFIGS[0], "train", 30)},
        TRAIN_CONFIGS[1]: {"train": p3_rows(TRAIN_CONFIGS[1], "train", 24)},
    }
    for c in rte_configs():
        store[c] = {"train": p3_rows(c, "train", 50), "validation": p3_rows(c, "validation", 10)}
    return store


# The first training config exists only in the original TFRecord layout, the rest as Parquet
# (the Hub's history: a conversion to per-config Parquet whose completeness is not established).
LAYOUT = {TRAIN_CONFIGS[0]: "tfrecord", rte_configs()[0]: "both"}


@pytest.fixture
def replica(tmp_path, monkeypatch):
    root = write_replica(tmp_path / "P3", _store(), layout=LAYOUT)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    # The Hub side of the source is the only thing replaced: listing, card and files come from the folder.
    monkeypatch.setattr(sources, "hub_access", lambda: sources.LocalAccess(root))
    return root, calls


def _cfg(source, out, **kw):
    return PrepConfig(
        "t0_train",
        source,
        "embedded",
        out,
        train_tasks=tuple(TRAIN_CONFIGS),
        held_out=(HELD,),
        val_per_template=5,
        few_shot_k=4,
        **kw,
    )


def _decoded(out, split):
    tok = load_tokenizer(out)
    return [(r["task_name"], tok.decode(r["input_ids"])) for r in load_split(out, split)]


def test_hub_reads_both_layouts(tmp_path, replica):
    root, calls = replica
    out = tmp_path / "out"
    build(_cfg("hub", out))
    m = read_manifest(out)
    assert m.source == f"hub:{root}"
    assert m.counts["train"] == {TRAIN_CONFIGS[0]: 25, TRAIN_CONFIGS[1]: 19}
    expect = [(c, r["inputs_pretokenized"]) for c, n in zip(TRAIN_CONFIGS, (25, 19)) for r in _store()[c]["train"][:n]]
    assert _decoded(out, "train") == expect
    assert len(load_split(out, f"eval/{HELD}")) == 10 * len(rte_configs())
    # Parquet configs go through datasets.load_dataset("parquet", data_files=<the card's files>);
    # the TFRecord-only config never does.
    parquet_calls = [c for c in calls if c[0] == "parquet"]
    assert parquet_calls and all(c[2]["data_files"][0].startswith(str(root)) for c in parquet_calls)
    assert any(f"{TRAIN_CONFIGS[1]}/train-00000-of-00001.parquet" in c[2]["data_files"][0] for c in parquet_calls)
    assert not any(TRAIN_CONFIGS[0] in c[2]["data_files"][0] for c in parquet_calls)
    # Every source file is fingerprinted in the manifest, the TFRecord feature spec included.
    assert any(
        f["file"].endswith(f"data/{TRAIN_CONFIGS[0]}/info.train.json") for f in m.sources[f"{TRAIN_CONFIGS[0]}/train"]
    )


def test_card_configs_mean_what_datasets_says(tmp_path, replica):
    """Our reading of the card's `configs` agrees with datasets' own (on a copy without the
    loading script: with it, datasets >= 4 refuses the whole repository)."""
    root, _ = replica
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported, but found P3.py"):
        datasets.load_dataset(str(root), TRAIN_CONFIGS[1], split="train")
    (root / "P3.py").unlink()
    theirs = datasets.load_dataset(str(root), TRAIN_CONFIGS[1], split="train")
    ours = sources.HubSource().open(sources.HubSource().resolve(TRAIN_CONFIGS[1], "train"))
    rows = [x for c in ours.chunks(range(ours.num_rows())) for x in c.columns["inputs_pretokenized"]]
    assert rows == theirs["inputs_pretokenized"]


def test_local_snapshot_equals_hub(tmp_path, replica):
    root, _ = replica
    build(_cfg("hub", tmp_path / "hub"))
    build(_cfg(f"local:{root}", tmp_path / "local"))
    a, b = read_manifest(tmp_path / "hub"), read_manifest(tmp_path / "local")
    assert a.counts == b.counts and a.few_shot == b.few_shot and a.tokenizer == b.tokenizer
    for split in ["train", "val", f"eval/{HELD}"]:
        assert _decoded(tmp_path / "hub", split) == _decoded(tmp_path / "local", split)


def test_missing_config_named_before_any_read(tmp_path, replica, monkeypatch):
    root, _ = replica
    import shutil

    shutil.rmtree(root / TRAIN_CONFIGS[1])  # card still declares it, files gone
    shutil.rmtree(root / "data" / TRAIN_CONFIGS[0])  # TFRecord-only config gone entirely
    import data_prep.pipeline as pl

    monkeypatch.setattr(pl, "_tokenizer", lambda *a: pytest.fail("data read before the missing configs were listed"))
    with pytest.raises(ConfigError) as e:
        build(_cfg("hub", tmp_path / "out"))
    msg = str(e.value)
    assert f"{TRAIN_CONFIGS[0]}/train: neither declared" in msg
    assert f"{TRAIN_CONFIGS[1]}/train: declared in README.md with splits ['train']" in msg


def test_hub_bad_record_names_hub_origin(tmp_path, replica):
    root, _ = replica
    store = _store()
    store[TRAIN_CONFIGS[1]]["train"][3]["targets_pretokenized"] = ""
    write_replica(root, store, layout=LAYOUT)
    with pytest.raises(DataError) as e:
        build(_cfg("hub", tmp_path / "o"))
    msg = str(e.value)
    assert f"hub:bigscience/P3/{TRAIN_CONFIGS[1]}/train" in msg and "row 3" in msg
    assert "targets_pretokenized" in msg


def test_hub_default_held_out_excludes_storycloze_and_explicit_request_fails(tmp_path):
    p = plan(PrepConfig("t0_train", "hub", "embedded", tmp_path / "o"))
    assert "storycloze" not in [h.name for h in p.held] and len(p.held) == 10
    assert p.excluded == {"storycloze": "not in bigscience/P3"}
    with pytest.raises(ConfigError, match="storycloze"):
        plan(PrepConfig("t0_train", "hub", "embedded", tmp_path / "o", held_out=("storycloze",)))


def test_offline_hub_is_a_named_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="cannot reach bigscience/P3 on the Hub.*--source local:PATH"):
        sources.HubAccess().sha()
