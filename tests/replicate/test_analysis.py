"""Dev/test split, learning-rate choice on dev, rows and tables, on constructed job results."""

import json

import pytest

from tensorpoly_ds.replicate.analysis import c7_verdict, row_name, scores_by_row, select_lr, split_accuracies, tables


def _result(label, mode, task, seed, lr, dev, test, k=16, mt=0):
    return {
        "label": label,
        "mode": mode,
        "task": task,
        "seed": seed,
        "k": k,
        "zero_shot": k == 0,
        "lr": lr,
        "job": {"multitask_steps": mt, "lr": lr},
        "dev": {"accuracy": dev},
        "test": {"accuracy": test},
        "row": row_name({"label": label, "mode": mode, "k": k, "zero_shot": k == 0, "job": {"multitask_steps": mt}}),
        "_dir": f"/x/{label}{mode}{task}{seed}{lr}{k}{mt}",
    }


def test_split_accuracies_uses_the_example_id_rule(tmp_path):
    recs = [
        {"example_id": i, "correct": ok}
        for i, ok in [(0, True), (1, False), (49, True), (50, True), (51, False), (52, False), (99, True)]
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    acc = split_accuracies(tmp_path, dev_examples=50)
    assert acc["dev"] == pytest.approx(2 / 3) and acc["test"] == pytest.approx(2 / 4)


def test_row_names():
    assert row_name({"label": "Poly", "mode": "z", "k": 16, "job": {}}) == "Poly (z)"
    assert row_name({"label": "Poly", "mode": "mu", "k": 0, "zero_shot": True, "job": {}}) == "Poly (mu, 0-shot)"
    assert (
        row_name({"label": "LoRA", "mode": "full", "k": 0, "zero_shot": True, "job": {"multitask_steps": 50}})
        == "LoRA (full, 0-shot, 50 mt steps)"
    )


def test_lr_is_chosen_on_dev_only_and_ties_take_the_smaller_lr():
    rs = []
    for task in ("a", "b"):
        for seed in (0, 1):
            # lr 0.01 is better on dev but worse on test: the choice must follow dev
            rs.append(_result("LoRA", "full", task, seed, 0.001, dev=0.5, test=0.9))
            rs.append(_result("LoRA", "full", task, seed, 0.01, dev=0.7, test=0.3))
            # a tie on dev: the smaller lr
            rs.append(_result("Poly", "z", task, seed, 0.001, dev=0.6, test=0.6))
            rs.append(_result("Poly", "z", task, seed, 0.01, dev=0.6, test=0.8))
    selected, table = select_lr(rs)
    chosen = {t["row"]: t["chosen_lr"] for t in table}
    assert chosen == {"LoRA (full)": 0.01, "Poly (z)": 0.001}
    assert {(r["row"], r["lr"]) for r in selected} == {("LoRA (full)", 0.01), ("Poly (z)", 0.001)}
    lora = next(t for t in table if t["row"] == "LoRA (full)")
    assert lora["lrs"]["0.001"]["test"] == pytest.approx(0.9) and lora["lrs"]["0.01"]["dev"] == pytest.approx(0.7)
    scores = scores_by_row(selected, 16)
    assert scores["LoRA (full)"] == {("a", 0): 0.3, ("a", 1): 0.3, ("b", 0): 0.3, ("b", 1): 0.3}


def test_tables_split_methods_modes_and_zero_shot():
    rs = [_result("LoRA", "full", "a", s, 0.01, 0.5, 0.5 + s / 10) for s in range(3)]
    rs += [_result("Poly", m, "a", s, 0.01, 0.5, 0.6) for m in ("full", "z", "mu") for s in range(3)]
    rs += [_result("Random-mu", "mu", "a", s, 0.01, 0.5, 0.4) for s in range(3)]
    rs += [_result("Poly", "mu", "a", s, 0.01, 0.5, 0.3, k=0, mt=mt) for s in range(3) for mt in (0, 50)]
    t = tables(rs, ["a"])
    t1, t4, z = t[16]["table1"], t[16]["table4"], t[0]["zero_shot"]
    assert t1["rows"] == [("LoRA", "full"), ("Poly", "full"), ("Random-mu", "mu")]
    assert t1["cells"][("LoRA", "full")]["a"]["median"] == pytest.approx(60.0)
    assert t1["cells"][("LoRA", "full")]["a"]["n"] == 3
    assert t4["rows"] == [("Poly", "full"), ("Poly", "z"), ("Poly", "mu")]
    assert [r[0] for r in z["rows"]] == ["Poly (mu, 0-shot)", "Poly (mu, 0-shot, 50 mt steps)"]


def test_c7_verdict_on_constructed_recoveries():
    """Each outcome from inputs where it is known. Mutations seen caught: `p_value <= alpha` (the p = alpha
    row turns reproduced), dropping `score > null_mean` (the below-null row turns reproduced), and
    'mixed' for a unanimous 'not reproduced'."""
    good = {"score": 0.9, "null_mean": 0.1, "p_value": 0.01}
    at_alpha = {"score": 0.9, "null_mean": 0.1, "p_value": 0.05}  # not below alpha: not reproduced
    below_null = {"score": 0.05, "null_mean": 0.1, "p_value": 0.01}  # significant, but the wrong way
    failed = {"error": "no routing tables"}
    assert c7_verdict({"Poly": good, "MHR": dict(good)}) == {
        "status": "reproduced",
        "per_method": {"Poly": "reproduced", "MHR": "reproduced"},
        "alpha": 0.05,
    }
    assert c7_verdict({"Poly": good, "MHR": at_alpha})["per_method"] == {"Poly": "reproduced", "MHR": "not reproduced"}
    assert c7_verdict({"Poly": good, "MHR": at_alpha})["status"] == "mixed"
    assert c7_verdict({"Poly": below_null, "MHR": at_alpha})["status"] == "not reproduced"
    assert c7_verdict({"Poly": good, "MHR": failed}) == {
        "status": "reproduced",
        "per_method": {"Poly": "reproduced"},
        "alpha": 0.05,
    }
    assert c7_verdict({"MHR": failed}) == {"status": "missing", "per_method": {}}
    assert c7_verdict({"Poly": at_alpha}, alpha=0.1)["status"] == "reproduced"
