"""The hub code path, against a local stand-in for datasets.load_dataset("bigscience/P3", config)."""
import datasets
import pytest

from data_prep import sources
from data_prep.errors import ConfigError, DataError
from data_prep.manifest import load_split, read_manifest
from data_prep.pipeline import PrepConfig, build

from conftest import HELD, TRAIN_CONFIGS, p3_rows, rte_configs


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    store = {c: {"train": p3_rows(c, "train", 30)} for c in TRAIN_CONFIGS}
    for c in rte_configs():
        store[c] = {"train": p3_rows(c, "train", 50), "validation": p3_rows(c, "validation", 10)}

    def load_dataset(path, name, split=None):
        calls.append((path, name, split))
        if name not in store:
            raise ValueError(f"BuilderConfig {name} not found")
        return datasets.Dataset.from_list(store[name][split])

    # Replace datasets.load_dataset itself: that is the call the real path makes.
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return store, calls


def test_hub_source_uses_load_dataset(tmp_path, fake_hub):
    store, calls = fake_hub
    out = tmp_path / "out"
    build(PrepConfig("t0_train", "hub", "embedded", out, train_tasks=tuple(TRAIN_CONFIGS), held_out=(HELD,),
                     val_per_template=5, few_shot_k=4), log=lambda m: None)
    assert ("bigscience/P3", TRAIN_CONFIGS[0], "train") in calls
    assert ("bigscience/P3", rte_configs()[0], "validation") in calls
    m = read_manifest(out)
    assert m.source == "hub" and m.counts["train"] == {c: 25 for c in TRAIN_CONFIGS}
    assert len(load_split(out, f"eval/{HELD}")) == 10 * len(rte_configs())


def test_hub_bad_record_names_hub_origin(tmp_path, fake_hub):
    store, _ = fake_hub
    store[TRAIN_CONFIGS[0]]["train"][3]["targets_pretokenized"] = ""
    with pytest.raises(DataError) as e:
        build(PrepConfig("t0_train", "hub", "embedded", tmp_path / "o", train_tasks=tuple(TRAIN_CONFIGS),
                         held_out=(HELD,)), log=lambda m: None)
    msg = str(e.value)
    assert "hub:bigscience/P3/glue_mrpc_equivalent/train" in msg and "row 3" in msg
    assert "targets_pretokenized" in msg and "glue_mrpc_equivalent" in msg


def test_hub_default_held_out_excludes_storycloze_and_explicit_request_fails(tmp_path, monkeypatch):
    from data_prep.pipeline import plan
    p = plan(PrepConfig("t0_train", "hub", "embedded", tmp_path / "o"))
    assert "storycloze" not in [h.name for h in p.held] and len(p.held) == 10
    assert p.excluded == {"storycloze": "not in bigscience/P3"}
    with pytest.raises(ConfigError, match="storycloze"):
        plan(PrepConfig("t0_train", "hub", "embedded", tmp_path / "o", held_out=("storycloze",)))
    assert callable(sources.hub_load_dataset)
