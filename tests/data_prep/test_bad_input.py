"""Every malformed-record case: DataError naming file, config, row and field; --skip-invalid counts."""

import pytest
from conftest import HELD, TRAIN_CONFIGS, local_args, make_dump, p3_rows, rte_configs, write_split

from data_prep.errors import DataError
from data_prep.manifest import read_manifest
from data_prep.pipeline import PrepConfig, build


def _cfg(dump, out, **kw):
    return PrepConfig(
        "t0_train",
        f"local:{dump}",
        "embedded",
        out,
        train_tasks=tuple(TRAIN_CONFIGS),
        held_out=(HELD,),
        val_per_template=5,
        few_shot_k=8,
        **kw,
    )


def _corrupt(dump, config, split, row, mutate, fmt="jsonl"):
    rows = p3_rows(config, split, {"train": 60 if config in rte_configs() else 40, "validation": 12}[split])
    mutate(rows[row])
    path = dump / config / f"{split}.jsonl"
    path.unlink()
    return write_split(dump / config, split, rows, fmt)


CASES = [
    ("missing_field", TRAIN_CONFIGS[0], "train", 7, lambda r: r.pop("inputs_pretokenized"), "inputs_pretokenized"),
    ("wrong_type", TRAIN_CONFIGS[1], "train", 2, lambda r: r.update(inputs_pretokenized=42), "inputs_pretokenized"),
    (
        "empty_target",
        TRAIN_CONFIGS[0],
        "train",
        11,
        lambda r: r.update(targets_pretokenized="  "),
        "targets_pretokenized",
    ),
    (
        "target_not_in_choices",
        None,
        "validation",
        3,
        lambda r: r.update(targets_pretokenized="maybe"),
        "targets_pretokenized",
    ),
    ("wrong_type", None, "validation", 4, lambda r: r.update(answer_choices="no ||| yes"), "answer_choices"),
    ("missing_field", None, "train", 9, lambda r: r.pop("answer_choices"), "answer_choices"),
]


# every case in JSON Lines; in Parquet all but wrong_type (a Parquet column has one type: a value of another
# type cannot be written into one row, see test_parquet_column_of_wrong_type)
FORMAT_CASES = [("jsonl", *c) for c in CASES] + [("parquet", *c) for c in CASES if c[0] != "wrong_type"]


@pytest.mark.parametrize("fmt,reason,config,split,row,mutate,field", FORMAT_CASES)
def test_bad_record_message(tmp_path, reason, config, split, row, mutate, field, fmt):
    dump = make_dump(tmp_path / "dump")
    config = config or rte_configs()[2]
    path = _corrupt(dump, config, split, row, mutate, fmt)
    with pytest.raises(DataError) as e:
        build(_cfg(dump, tmp_path / "out"))
    msg = str(e.value)
    assert str(path) in msg and repr(config) in msg and f"row {row}" in msg and repr(field) in msg
    assert reason in msg
    assert not (tmp_path / "out").exists()


def test_skip_invalid_counts_per_reason(tmp_path, run):
    dump = make_dump(tmp_path / "dump")
    groups = {}
    for reason, config, split, row, mutate, _ in CASES:
        groups.setdefault((config or rte_configs()[0], split), []).append((row, mutate))
    for (config, split), edits in groups.items():
        rows = p3_rows(config, split, {"train": 60 if config in rte_configs() else 40, "validation": 12}[split])
        for row, mutate in edits:
            mutate(rows[row])
        (dump / config / f"{split}.jsonl").unlink()
        write_split(dump / config, split, rows, "jsonl")
    out = tmp_path / "out"
    assert run(local_args(dump, out)) == 2
    assert run(local_args(dump, out, "--skip-invalid")) == 0
    m = read_manifest(out)
    assert m.skipped["total"] == {"missing_field": 2, "wrong_type": 2, "empty_target": 1, "target_not_in_choices": 1}
    assert m.skipped["by_config"][f"{TRAIN_CONFIGS[0]}/train"] == {"empty_target": 1, "missing_field": 1}
    assert m.counts["train"] == {TRAIN_CONFIGS[0]: 33, TRAIN_CONFIGS[1]: 34}
    assert m.counts["eval"][HELD] == 12 * len(rte_configs()) - 2
    # The shot with a missing choice list (row 9 of the pool) can never be drawn.
    assert all(9 not in ids for ids in m.few_shot[HELD]["example_ids"].values())


def test_parquet_column_of_wrong_type(tmp_path):
    dump = make_dump(tmp_path / "dump")
    rows = p3_rows(TRAIN_CONFIGS[1], "train", 40)
    for i, r in enumerate(rows):
        r["inputs_pretokenized"] = i
    (dump / TRAIN_CONFIGS[1] / "train.jsonl").unlink()
    path = write_split(dump / TRAIN_CONFIGS[1], "train", rows, "parquet")
    with pytest.raises(DataError) as e:
        build(_cfg(dump, tmp_path / "out"))
    msg = str(e.value)
    assert str(path) in msg and "row 0" in msg and "'inputs_pretokenized'" in msg and "wrong_type" in msg


def test_malformed_json_line(tmp_path):
    """The error names the file, the row (0-based, as --skip-invalid counts them), its line and the reason.
    Mutation seen caught: DataError raised with path '' and row -1 (message without file and row): fails,
    where the old regex r"row 5.*|invalid JSON" passed."""
    dump = make_dump(tmp_path / "dump")
    p = dump / TRAIN_CONFIGS[0] / "train.jsonl"
    lines = p.read_text().splitlines()
    lines[5] = lines[5][:-3]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        build(_cfg(dump, tmp_path / "out"))
    msg = str(e.value)
    assert msg.startswith("invalid JSON on line 6 (") and "[reason=malformed_json]" in msg
    assert f"in file {p}," in msg and "row 5," in msg


def test_bad_record_late_in_the_mixture_keeps_the_finished_configs(tmp_path, emb_dir):
    """Configs are validated and tokenised one at a time: a bad record in the last held-out config
    stops the run with a named error, the parts finished before it stay cached, and the rerun
    after the fix reuses them instead of starting over."""
    from data_prep.pipeline import build

    dump = make_dump(tmp_path / "dump")
    path = _corrupt(dump, rte_configs()[-1], "validation", 0, lambda r: r.update(targets_pretokenized=""))
    cfg = PrepConfig(
        "t0_train",
        f"local:{dump}",
        str(emb_dir / "tokenizer"),
        tmp_path / "out",
        train_tasks=tuple(TRAIN_CONFIGS),
        held_out=(HELD,),
        val_per_template=5,
        few_shot_k=8,
    )
    with pytest.raises(DataError) as e:
        build(cfg)
    assert str(path) in str(e.value) and "row 0" in str(e.value)
    assert not (tmp_path / "out").exists()
    _corrupt(dump, rte_configs()[-1], "validation", 0, lambda r: None)
    res = build(cfg)
    assert (res.parts_reused, res.parts_built) == (len(TRAIN_CONFIGS), 1)


@pytest.mark.slow
def test_bad_record_in_a_worker_process_keeps_its_message(tmp_path, run, capsys, emb_dir):
    """With --num-proc 2 the error is raised in a worker process and must reach the user intact
    (an hf tokenizer path: the embedded one would meet the record first, in the parent's vocabulary pass)."""
    dump = make_dump(tmp_path / "dump")
    path = _corrupt(dump, TRAIN_CONFIGS[1], "train", 4, lambda r: r.pop("targets_pretokenized"))
    args = local_args(dump, tmp_path / "out", "--num-proc", "2")
    args[args.index("--tokenizer") + 1] = str(emb_dir / "tokenizer")
    assert run(args) == 2
    err = capsys.readouterr().err
    assert f"in file {path}, config {TRAIN_CONFIGS[1]!r}, row 4, field 'targets_pretokenized'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
