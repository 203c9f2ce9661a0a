"""The pretraining learning-rate search (tensorpoly_ds.engine.lr_search) on constructed losses: the choice, the
edge rule, the routing axis at the chosen module lr, reuse of finished candidates, unreadable results.
Mutations seen caught: choosing the larger lr on ties (test_ties_go_to_the_smaller_lr), extending without the
max_extensions bound (test_edge_rule_extends_until_interior_or_bound), searching routing before module lr
(test_search_runs_routing_at_the_chosen_module_lr)."""

import json
import math

import pytest

from tensorpoly_ds.engine.lr_search import (
    LrSearchError,
    LrSearchSection,
    beyond,
    edge_of,
    final_val_loss,
    search,
    search_axis,
    select,
)


def test_ties_go_to_the_smaller_lr_and_diverged_runs_lose():
    assert select({1e-3: 0.5, 1e-2: 0.5, 3e-2: 0.7}) == 1e-3
    assert select({1e-3: math.inf, 1e-2: 0.9}) == 1e-2


def test_edges_and_the_next_grid_step():
    grid = [1e-3, 3e-3, 1e-2]
    assert edge_of(1e-3, grid) == "low" and edge_of(1e-2, grid) == "high" and edge_of(3e-3, grid) is None
    assert edge_of(1e-3, [1e-3]) is None  # one value: no ratio to extend by
    assert beyond(grid, "low") == pytest.approx(3.33e-4) and beyond(grid, "high") == pytest.approx(3.33e-2)


def _bowl(optimum):
    return lambda values: {v: (math.log10(v) - math.log10(optimum)) ** 2 for v in values}


def test_edge_rule_extends_until_interior_or_bound():
    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    calls = []

    def evaluate(values):
        calls.append(list(values))
        return _bowl(2e-4)(values)

    axis = search_axis("module_lr", grid, evaluate, max_extensions=3)
    # 3.33e-4 is still the smallest, so one more step; 1.11e-4 is worse: 3.33e-4 is interior
    assert axis.extended == [3.33e-4, 1.11e-4] and axis.chosen == 3.33e-4 and axis.edge is None
    assert calls == [grid, [3.33e-4], [1.11e-4]]
    bounded = search_axis("module_lr", grid, _bowl(2e-4), max_extensions=1)
    assert bounded.extended == [3.33e-4] and bounded.chosen == 3.33e-4 and bounded.edge == "low"
    interior = search_axis("module_lr", grid, _bowl(3e-3), max_extensions=2)
    assert interior.extended == [] and interior.chosen == 3e-3 and interior.edge is None


def _fake_trainer(loss_of, trained):
    """Writes what a finished pretraining run leaves: metrics.jsonl with a val/loss, and export/."""

    def train(candidates):
        for c in candidates:
            lrs = dict(c.lrs)
            trained.append(c.name)
            (c.run_dir / "export").mkdir(parents=True)
            (c.run_dir / "metrics.jsonl").write_text(
                json.dumps({"kind": "eval", "step": 10, "val/loss": 9.0})
                + "\n"
                + json.dumps({"kind": "eval", "step": 20, "val/loss": loss_of(lrs)})
                + "\n"
            )

    return train


def test_search_runs_routing_at_the_chosen_module_lr_and_reuses_finished_runs(tmp_path):
    base = {
        "adapter": {"method": "poly", "rank": 1, "skills": 4},
        "optim": {"module_lr": 1e-2, "routing_lr": 0.1},
        "train": {"steps": 20},
        "run": {"dir": "x"},
    }
    spec = LrSearchSection(module_lrs=[1e-3, 1e-2, 3e-2], routing_lrs=[0.01, 0.1, 1.0], max_extensions=2)
    spec.validate("test")

    def loss(lrs):  # best module lr 1e-2; best routing lr 1.0 only at module lr 1e-2
        bonus = 0.2 if (lrs["module_lr"], lrs["routing_lr"]) == (1e-2, 1.0) else 0.0
        return abs(math.log10(lrs["module_lr"]) + 2) + abs(math.log10(lrs["routing_lr"]) + 1) / 10 - bonus

    trained = []
    result = search(base, spec, tmp_path, _fake_trainer(loss, trained))
    assert result["chosen"] == {"module_lr": 1e-2, "routing_lr": 1.0}
    module_axis, routing_axis = result["axes"]
    assert module_axis["key"] == "module_lr" and module_axis["extended"] == []
    assert routing_axis["key"] == "routing_lr" and set(routing_axis["losses"]) == {"0.01", "0.1", "1", "10"}
    assert routing_axis["extended"] == [10.0] and routing_axis["edge"] is None
    # the module axis's candidate at the run's routing lr is the routing axis's 0.1 candidate: trained once
    assert trained.count("module_lr=0.01,routing_lr=0.1") == 1 and len(trained) == 3 + 3
    assert result["chosen_run"].endswith("module_lr=0.01_routing_lr=1")
    written = json.loads((tmp_path / "lr_search.json").read_text())
    assert written["chosen"] == result["chosen"]
    again = []
    assert search(base, spec, tmp_path, _fake_trainer(loss, again))["chosen"] == result["chosen"]
    assert again == []  # every candidate was finished: nothing retrains


def test_unrouted_methods_search_the_module_lr_only(tmp_path):
    base = {"adapter": {"method": "lora", "rank": 1}, "optim": {"module_lr": 1e-2, "routing_lr": 0.1}}
    spec = LrSearchSection(module_lrs=[1e-3, 1e-2], routing_lrs=[0.01, 1.0], max_extensions=0)
    spec.validate("test")
    trained = []
    result = search(base, spec, tmp_path, _fake_trainer(lambda lrs: lrs["module_lr"], trained))
    assert result["chosen"] == {"module_lr": 1e-3} and [a["key"] for a in result["axes"]] == ["module_lr"]
    assert result["axes"][0]["edge"] == "low"  # reported, not hidden, when no extension is allowed


def test_unreadable_or_diverged_results(tmp_path):
    with pytest.raises(LrSearchError, match=r"metrics.jsonl: no 'val/loss' record"):
        final_val_loss(tmp_path)
    assert final_val_loss(tmp_path, missing_ok=True) is None
    (tmp_path / "metrics.jsonl").write_text('{"val/loss": NaN}\n{"cut')
    assert final_val_loss(tmp_path) == math.inf


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"module_lrs": []}, "module_lrs is empty"),
        ({"module_lrs": [1e-3, -1]}, "module_lrs = "),
        ({"module_lrs": [1e-3, 1e-3]}, r"module_lrs = \[0.001, 0.001\]: duplicate values"),
        ({"module_lrs": [1e-3], "steps": 0}, "steps = 0"),
        ({"module_lrs": [1e-3], "max_extensions": -1}, "max_extensions = -1"),
    ],
)
def test_bad_specs_name_the_field(fields, message):
    with pytest.raises(LrSearchError, match="where: " + message):
        LrSearchSection(**fields).validate("where")
