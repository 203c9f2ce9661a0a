"""Cap rule end to end, truncation counts, unknown names."""

import pytest
from conftest import TRAIN_CONFIGS, local_args, make_dump, p3_rows

from data_prep.cli import PROG, main
from data_prep.errors import ConfigError
from data_prep.manifest import load_split, read_manifest
from data_prep.pipeline import PrepConfig, plan
from tpds_common.errors import report_user_errors


def test_budget_cap_rule_scaled(tmp_path, run):
    """budget:70 over glue/mrpc's 7 templates -> 70 // 7 = 10 rows each, train[0:10]."""
    dump = make_dump(tmp_path / "dump")
    out = tmp_path / "out"
    assert run(local_args(dump, out, "--cap-per-template", "budget:70")) == 0
    m = read_manifest(out)
    assert m.counts["train"] == {c: 10 for c in TRAIN_CONFIGS}
    assert m.counts["val"] == {c: 5 for c in TRAIN_CONFIGS}
    assert "70 // n_templates" in m.rule["cap"]
    from data_prep.manifest import load_tokenizer

    tok = load_tokenizer(out)
    got = [tok.decode(r["input_ids"]) for r in load_split(out, "train") if r["task_name"] == TRAIN_CONFIGS[0]]
    assert got == [r["inputs_pretokenized"] for r in p3_rows(TRAIN_CONFIGS[0], "train", 10)]
    out2 = tmp_path / "out2"
    assert run(local_args(dump, out2, "--cap-per-template", "13")) == 0
    assert read_manifest(out2).counts["train"] == {c: 13 for c in TRAIN_CONFIGS}
    out3 = tmp_path / "out3"
    assert run(local_args(dump, out3, "--cap-per-template", "none")) == 0
    assert read_manifest(out3).counts["train"] == {c: 35 for c in TRAIN_CONFIGS}


def test_truncation_is_counted(tmp_path, run):
    dump = make_dump(tmp_path / "dump")
    out = tmp_path / "out"
    # Inputs are 8 words; targets are 1 word + EOS. Input cap 5 cuts every input,
    # and eval choices ("no"/"yes" + EOS) fit in 2.
    assert run(local_args(dump, out, "--max-input-len", "5", "--max-target-len", "2")) == 0
    m = read_manifest(out)
    assert m.truncated["train"] == {c: {"input": 35, "target": 0} for c in TRAIN_CONFIGS}
    assert m.truncated["eval"]["rte"]["input"] == m.counts["eval"]["rte"]
    assert all(len(x) == 5 for x in load_split(out, "train")["input_ids"])
    out2 = tmp_path / "out2"
    assert run(local_args(dump, out2, "--max-target-len", "1")) == 0
    m2 = read_manifest(out2)
    assert m2.truncated["train"] == {c: {"input": 0, "target": 35} for c in TRAIN_CONFIGS}
    assert all(t == [1] for t in load_split(out2, "train")["target_ids"])  # EOS survives the cut


@pytest.mark.parametrize(
    "kw,needle",
    [
        (
            {"mixture": "t1_train"},
            "valid mixtures: embedded, latent_skills, latent_skills_noprompt, t0_train, t0_train_og",
        ),
        ({"source": "ftp:x"}, "valid sources: hub, embedded, local:PATH"),
        ({"train_tasks": ("nope",)}, "valid training tasks: emb_"),
        ({"held_out": ("rte",)}, "valid held-out tasks: emb_"),
        ({"source": "local:/nonexistent/dump"}, "not a directory"),
        ({"mixture": "t0_train"}, "the embedded source only provides the embedded mixture"),
    ],
)
def test_unknown_names(tmp_path, kw, needle):
    args = dict(mixture="embedded", source="embedded", tokenizer="embedded", out=tmp_path / "o")
    args.update(kw)
    from data_prep.pipeline import build

    with pytest.raises(ConfigError) as e:
        build(PrepConfig(**args))
    assert needle in str(e.value)
    assert not (tmp_path / "o").exists()


def test_cli_unknown_mixture_exit_code(tmp_path, capsys):
    argv = ["--mixture", "nope", "--source", "embedded", "--tokenizer", "embedded", "--out", str(tmp_path / "o")]
    assert report_user_errors(PROG, main, argv) == 2
    assert "valid mixtures" in capsys.readouterr().err


def test_missing_local_configs_listed_before_loading(tmp_path):
    dump = make_dump(tmp_path / "dump")
    import shutil

    shutil.rmtree(dump / TRAIN_CONFIGS[1])
    with pytest.raises(ConfigError, match=f"lacks data for:\n  {TRAIN_CONFIGS[1]}/train"):
        from data_prep.pipeline import build

        build(
            PrepConfig(
                "t0_train",
                f"local:{dump}",
                "embedded",
                tmp_path / "o",
                train_tasks=tuple(TRAIN_CONFIGS),
                held_out=("rte",),
            )
        )


def test_bad_options():
    with pytest.raises(ConfigError, match="max-input-len"):
        plan(PrepConfig("embedded", "embedded", "embedded", "o", max_input_len=0))
    with pytest.raises(ConfigError, match="duplicates"):
        plan(PrepConfig("embedded", "embedded", "embedded", "o", few_shot_seeds=(1, 1)))
