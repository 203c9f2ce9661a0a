"""Round trips: P3 records in Parquet / JSON Lines / Arrow -> shards, contents checked."""

import pytest
from conftest import HELD, TRAIN_CONFIGS, local_args, make_dump, p3_rows, rte_configs

from data_prep.manifest import load_split, load_tokenizer, read_manifest


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "arrow"])
def test_round_trip(tmp_path, run, fmt):
    dump = make_dump(tmp_path / "dump", fmt)
    out = tmp_path / "out"
    assert run(local_args(dump, out)) == 0
    m = read_manifest(out)
    assert m.tasks == TRAIN_CONFIGS and m.held_out == [HELD]
    assert m.source == f"local:{dump.resolve()}"
    # 40 rows, 5 held back from the end for val, the default cap does not bite.
    assert m.counts["train"] == {c: 35 for c in TRAIN_CONFIGS}
    assert m.counts["val"] == {c: 5 for c in TRAIN_CONFIGS}
    tok = load_tokenizer(out)
    train = load_split(out, "train")
    assert len(train) == 70 and train.features["input_ids"].feature.dtype == "int32"
    assert train.features["task_id"].dtype == "int32"
    expect = p3_rows(TRAIN_CONFIGS[1], "train", 40)
    rows = [r for r in train if r["task_name"] == TRAIN_CONFIGS[1]]
    assert {r["task_id"] for r in rows} == {1}
    for r, e in zip(rows, expect):
        assert tok.decode(r["input_ids"]) == e["inputs_pretokenized"]
        assert r["target_ids"][-1] == 1 and 1 not in r["input_ids"]
        assert tok.decode(r["target_ids"][:-1]) == e["targets_pretokenized"]
    val = load_split(out, "val")
    assert tok.decode(val[0]["input_ids"]) == p3_rows(TRAIN_CONFIGS[0], "train", 40)[35]["inputs_pretokenized"]

    ev = load_split(out, f"eval/{HELD}")
    assert len(ev) == 12 * len(rte_configs())
    assert ev.column_names == ["task_name", "template", "example_id", "input_ids", "choice_ids", "label"]
    for r in ev.select(range(12)):
        assert [tok.decode(c[:-1]) for c in r["choice_ids"]] == ["no", "yes"]
        assert r["label"] == r["example_id"] % 2
    fs = load_split(out, f"few_shot/{HELD}/8_shot/0_seed")
    assert len(fs) == 8 * len(rte_configs()) and len(set(fs["example_id"])) == 8
    for r in fs:
        assert r["target_ids"] == r["choice_ids"][r["label"]]


def test_hf_tokenizer_by_path(tmp_path, run, emb_dir):
    """A tokenizer given as a path goes through AutoTokenizer and is recorded as kind 'hf'."""
    dump = make_dump(tmp_path / "dump", "jsonl")
    out = tmp_path / "out"
    args = local_args(dump, out)
    args[args.index("--tokenizer") + 1] = str(emb_dir / "tokenizer")
    assert run(args) == 0
    m = read_manifest(out)
    assert m.tokenizer["kind"] == "hf" and m.tokenizer["name_or_path"] == str(emb_dir / "tokenizer")
    assert not (out / "tokenizer").exists()
    assert load_tokenizer(out).eos_token_id == 1


def test_sharded_split_files_are_read_in_order(tmp_path, run):
    dump = make_dump(tmp_path / "dump", "jsonl")
    c = TRAIN_CONFIGS[0]
    rows = p3_rows(c, "train", 40)
    (dump / c / "train.jsonl").unlink()
    import shutil

    from conftest import write_split

    write_split(dump / c / "tmp_a", "train", rows[:25], "parquet")
    write_split(dump / c / "tmp_b", "train", rows[25:], "parquet")
    shutil.move(dump / c / "tmp_a" / "train.parquet", dump / c / "train-00000-of-00002.parquet")
    shutil.move(dump / c / "tmp_b" / "train.parquet", dump / c / "train-00001-of-00002.parquet")
    shutil.rmtree(dump / c / "tmp_a"), shutil.rmtree(dump / c / "tmp_b")
    out = tmp_path / "out"
    assert run(local_args(dump, out)) == 0
    tok = load_tokenizer(out)
    train = load_split(out, "train")
    got = [tok.decode(r["input_ids"]) for r in train if r["task_name"] == c]
    assert got == [r["inputs_pretokenized"] for r in rows[:35]]
