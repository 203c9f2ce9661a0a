import pytest

from data_prep.errors import ConfigError
from data_prep.mixture import CapRule, get_mixture, load_t0_tasks


def test_shipped_t0_tasks_has_313_train_tasks_and_11_held_out():
    m = get_mixture("t0_train")
    names = [t.task for t in m.train]
    assert len(names) == 313 and len(set(names)) == 313
    assert len({t.dataset for t in m.train}) == 38
    assert [h.name for h in m.held_out] == [h["task"] for h in load_t0_tasks()["held_out_eval"]]
    assert len(m.held_out) == 11
    assert len(get_mixture("t0_train_og").train) == 222
    k = {h.name: h.few_shot_k for h in m.held_out}
    assert k == {
        "rte": 32,
        "cb": 32,
        "anli-r1": 50,
        "anli-r2": 50,
        "anli-r3": 50,
        "wsc": 32,
        "winogrande": 50,
        "copa": 32,
        "h-swag": 20,
        "storycloze": 70,
        "wic": 32,
    }
    anli = m.held_out_task("anli-r1")
    assert (anli.eval_split, anli.few_shot_split) == ("test", "train")
    assert not m.held_out_task("storycloze").on_hub
    assert len(m.held_out_task("h-swag").templates) == 4  # original-task templates only


def test_embedded_mixture_shape():
    m = get_mixture("embedded")
    assert 12 <= len(m.train) <= 16
    assert 2 <= len(m.held_out) <= 4
    assert {h.few_shot_k for h in m.held_out} <= {16, 32}


def test_cap_rule():
    default = CapRule.parse(None)
    assert default.cap(10_000_000, 7) == 500_000 // 7
    assert default.cap(3668, 7) == 3668
    assert CapRule.parse("budget:70").cap(100, 7) == 10
    assert CapRule.parse("25").cap(100, 7) == 25
    assert CapRule.parse("25").cap(10, 7) == 10
    assert CapRule.parse("none").cap(123, 7) == 123
    for bad in ("x", "budget:", "0", "-3"):
        with pytest.raises(ConfigError):
            CapRule.parse(bad)
