"""Protocol v2's rules on constructed inputs: the adaptation edge rule, "did not train", untestable claims,
pooling and spread over worlds, world and recipe validation, and v1 protocols unchanged by the new fields.
Mutations seen caught: a did-not-train limit of factor x the *best* loss instead of the reference's
(test_did_not_train_is_relative_to_the_reference), untestable comparisons counted as contradicted
(test_untestable_rows_never_contradict), seeds shared across worlds accepted (test_worlds_must_not_share_seeds)."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tensorpoly_ds.analysis.claims import ClaimSpec, Comparison, evaluate_claims
from tensorpoly_ds.replicate.analysis import scores_by_row, world_averages
from tensorpoly_ds.replicate.config import MethodSpec, ReplicateConfigError, load_config
from tensorpoly_ds.replicate.run import edge_extensions, pretraining_table
from tensorpoly_ds.replicate.stages import protocol

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "variants": [{"name": "np", "mixture": "latent_skills_noprompt"}],
    "methods": [
        {"label": "Poly", "adapter": {"method": "poly", "skills": 4}},
        {"label": "TP", "adapter": {"method": "tensorpoly_i", "tensor_rank": 2, "rank": 2}},
    ],
    "worlds": [
        {"name": "w0", "backbone_seed": 0, "pretrain_seed": 42, "seeds": [0, 1]},
        {"name": "w1", "backbone_seed": 1, "pretrain_seed": 43, "seeds": [2, 3]},
    ],
    "pretrain": {"lr_search": {"module_lrs": [1e-3, 1e-2]}, "untrained_reference": "Poly"},
}


def _load(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_edge_rule_extends_rows_at_an_edge_up_to_the_bound():
    grid = [1e-3, 1e-2]
    sel = [
        {"row": "A (full)", "k": 4, "chosen_lr": 1e-2, "lrs": {"0.001": {}, "0.01": {}}},
        {"row": "B (full)", "k": 4, "chosen_lr": 1e-3, "lrs": {"0.001": {}, "0.01": {}}},
        {"row": "C (full)", "k": 4, "chosen_lr": 1e-2, "lrs": {"0.001": {}, "0.01": {}, "0.1": {}}},
        {"row": "D (full)", "k": 4, "chosen_lr": 0.1, "lrs": {"0.001": {}, "0.01": {}, "0.1": {}}},
    ]
    got = edge_extensions(sel, grid, max_extensions=1)
    # A and B at an edge get one step beyond; C is interior after its extension (kept); D used its one extension
    assert got == {("A (full)", 4): [0.1], ("B (full)", 4): [1e-4], ("C (full)", 4): [0.1], ("D (full)", 4): [0.1]}
    assert edge_extensions(sel[:2], grid, max_extensions=0) == {}


@dataclass
class _Run:
    variant: str
    method: MethodSpec
    run_dir: Path


def _runs(tmp_path, losses):
    runs = {}
    for world, per in losses.items():
        runs[world] = []
        for label, loss in per.items():
            d = tmp_path / world / label
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 4, "val/loss": loss}) + "\n")
            runs[world].append(_Run("np", MethodSpec(label=label, adapter={"method": "lora"}), d))
    return runs


def test_did_not_train_is_relative_to_the_reference(tmp_path):
    cfg = _load(tmp_path, BASE)
    runs = _runs(tmp_path, {"w0": {"Poly": 0.5, "TP": 1.4, "Best": 0.1}, "w1": {"Poly": 0.7, "TP": 0.9, "Best": 0.1}})
    table = pretraining_table(cfg, "np", runs, searched={})
    assert table["methods"]["TP"]["mean_val_loss"] == pytest.approx(1.15)
    assert table["methods"]["TP"]["val_loss"] == {"w0": 1.4, "w1": 0.9}
    # limit 2 x mean(0.5, 0.7) = 1.2: TP (1.15) trained; a loss above it did not
    assert table["did_not_train"] == {}
    runs = _runs(tmp_path / "b", {"w0": {"Poly": 0.5, "TP": 1.5}, "w1": {"Poly": 0.7, "TP": 1.0}})
    table = pretraining_table(cfg, "np", runs, searched={})
    assert list(table["did_not_train"]) == ["TP"] and "1.25 > 2 x Poly's 0.600" in table["did_not_train"]["TP"]


def test_task_blind_rows_are_judged_against_the_task_blind_reference(tmp_path):
    """Protocol v2.1: with untrained_task_blind_reference set, rows without learned routing (LoRA, TLoRA,
    Random-mu) are judged against it, routed rows still against untrained_reference. Mutations tried: judging
    every row against the task-blind reference (TP, 0.9 > 2 x Poly's, is no longer marked); deciding task-blind by
    `routed` alone (Random-mu, routing random, is judged against Poly and marked)."""
    methods = [
        {"label": "Poly", "adapter": {"method": "poly", "skills": 4}},
        {"label": "TP", "adapter": {"method": "tensorpoly_i", "tensor_rank": 2, "rank": 2}},
        {"label": "LoRA", "adapter": {"method": "lora"}},
        {"label": "TLoRA", "adapter": {"method": "tlora", "rank": 2}},
        {"label": "Random-mu", "adapter": {"method": "poly", "skills": 4, "routing": "random"}, "modes": ["mu"]},
    ]
    data = {**BASE, "methods": methods, "pretrain": {**BASE["pretrain"], "untrained_task_blind_reference": "LoRA"}}
    cfg = _load(tmp_path, data)
    assert [m.label for m in cfg.methods if cfg.task_blind(m)] == ["LoRA", "TLoRA", "Random-mu"]
    losses = {"Poly": 0.2, "TP": 0.9, "LoRA": 1.2, "TLoRA": 2.3, "Random-mu": 2.5}
    runs = {"w0": [_Run("np", cfg.method(label), _loss_dir(tmp_path / label, loss)) for label, loss in losses.items()]}
    marked = pretraining_table(cfg, "np", runs, searched={})["did_not_train"]
    assert sorted(marked) == ["Random-mu", "TP"]
    assert "2.5 > 2 x LoRA's 1.200" in marked["Random-mu"] and "0.9 > 2 x Poly's 0.200" in marked["TP"]
    (tmp_path / "v2").mkdir()
    v2 = _load(tmp_path / "v2", {**data, "pretrain": BASE["pretrain"], "methods": methods})
    assert sorted(pretraining_table(v2, "np", runs, searched={})["did_not_train"]) == [
        "LoRA",
        "Random-mu",
        "TLoRA",
        "TP",
    ]


@pytest.mark.parametrize(
    "reference, message",
    [
        ("Poly", "'Poly' is not a task-blind pretrained method"),
        ("Nope", "'Nope' is not a task-blind pretrained method"),
    ],
)
def test_the_task_blind_reference_must_be_task_blind(tmp_path, reference, message):
    data = {
        **BASE,
        "methods": BASE["methods"] + [{"label": "LoRA", "adapter": {"method": "lora"}}],
        "pretrain": {**BASE["pretrain"], "untrained_task_blind_reference": reference},
    }
    with pytest.raises(ReplicateConfigError, match=message):
        _load(tmp_path, data)


def _loss_dir(d: Path, loss: float) -> Path:
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 4, "val/loss": loss}) + "\n")
    return d


def test_untestable_rows_never_contradict():
    scores = {
        "A (full)": {("t", s): 0.2 for s in range(8)},
        "B (full)": {("t", s): 0.9 for s in range(8)},
        "C (full)": {("t", s): 0.5 + 0.01 * s for s in range(8)},
    }
    claims = [
        ClaimSpec("X", "A beats B", [Comparison("A (full)", "B (full)", "greater", 0.0)]),
        ClaimSpec(
            "Y",
            "mixed",
            [Comparison("A (full)", "B (full)", "greater", 0.0), Comparison("B (full)", "C (full)", "greater", 0.0)],
        ),
    ]
    plain = evaluate_claims(scores, claims)
    assert plain[0].status == "contradicted"
    marked = evaluate_claims(scores, claims, untestable={"A (full)": "did not train"})
    assert marked[0].status == "untestable" and marked[0].comparisons[0].verdict is not None  # numbers kept
    assert "A (full): did not train" in marked[0].comparisons[0].detail
    assert marked[1].status == "mixed"  # the testable comparison is reproduced, the other untestable


def test_worlds_pool_their_pairs_and_report_the_spread():
    rows = []
    for world, seeds, acc in (("w0", [0, 1], 0.6), ("w1", [2, 3], 0.8), ("w2", [4, 5], 0.7)):
        for s in seeds:
            for task in ("t1", "t2"):
                rows.append(
                    {
                        "row": "A (full)",
                        "k": 4,
                        "seed": s,
                        "task": task,
                        "mode": "full",
                        "label": "A",
                        "job": {},
                        "test": {"accuracy": acc},
                    }
                )
    seed_world = {s: w for w, seeds in (("w0", [0, 1]), ("w1", [2, 3]), ("w2", [4, 5])) for s in seeds}
    pairs = scores_by_row(rows, 4)["A (full)"]
    assert len(pairs) == 2 * 2 * 3  # tasks x seeds x worlds, no key collides
    spread = world_averages(rows, seed_world, ["t1", "t2"], 4)["A (full)"]
    assert spread["worlds"] == pytest.approx({"w0": 0.6, "w1": 0.8, "w2": 0.7}) and spread["range"] == pytest.approx(
        0.2
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {
                "worlds": [
                    {"name": "w0", "backbone_seed": 0, "pretrain_seed": 1, "seeds": [0, 1]},
                    {"name": "w1", "backbone_seed": 1, "pretrain_seed": 2, "seeds": [1, 2]},
                ]
            },
            "seed 1 is also a seed of world 'w0'",
        ),
        ({"worlds": [{"name": "a b", "backbone_seed": 0, "pretrain_seed": 1, "seeds": [0]}]}, "worlds: names"),
        ({"pretrain": {"lr_search": {"module_lrs": [1e-3], "grid": 1}}}, "unknown key"),
        ({"pretrain": {"untrained_reference": "Nope"}}, "'Nope' is not a pretrained method"),
        (
            {"methods": [{"label": "Poly", "adapter": {"method": "poly"}, "pretrain": {"optimiser": "adamw"}}]},
            "unknown key",
        ),
        (
            {"methods": [{"label": "Poly", "adapter": {"method": "poly"}, "pretrain": {"optimizer": "sgd"}}]},
            "pretrain.optimizer: 'sgd'",
        ),
        (
            {
                "methods": [{"label": "Poly", "adapter": {"method": "poly"}, "pretrain": {"search": True}}],
                "pretrain": {},
            },
            "no pretrain.lr_search grid",
        ),
        ({"adapt": {"lrs": [1e-3], "max_extensions": 1}}, "at least two learning rates"),
        ({"prep": {"seeds": [0, 1]}}, "prep.seeds: not used when 'worlds' is given"),
        ({"pretrain": {"seed": 7}}, "pretrain.seed: not used when 'worlds' is given"),
    ],
)
def test_worlds_must_not_share_seeds_and_recipes_are_checked(tmp_path, change, message):
    with pytest.raises(ReplicateConfigError) as err:
        _load(tmp_path, {**BASE, **change})
    assert message in str(err.value) and "r.yaml" in str(err.value)


def test_method_recipes_and_search_world(tmp_path):
    data = {
        **BASE,
        "methods": [
            *BASE["methods"],
            {
                "label": "Official",
                "adapter": {"method": "tensorpoly_i"},
                "pretrain": {"optimizer": "adafactor", "module_lr": 3e-4, "search": False},
            },
        ],
    }
    cfg = _load(tmp_path, data)
    assert cfg.method_pretrain(cfg.method("Official")) == {
        "optimizer": "adafactor",
        "module_lr": 3e-4,
        "routing_lr": 0.1,
        "search": False,
    }
    assert cfg.method_pretrain(cfg.method("Poly"))["search"] is True
    assert cfg.search_seeds() == [0, 1] and cfg.all_seeds() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["full.yaml", "ci.yaml"])
def test_v1_protocols_are_unchanged_by_the_v2_fields(name):
    body = json.loads(json.dumps(protocol(load_config(ROOT / "configs" / "replicate" / name)), default=str))
    assert "worlds" not in body and not {
        "lr_search",
        "untrained_reference",
        "untrained_factor",
        "untrained_task_blind_reference",
    } & set(body["pretrain"])
    assert "max_extensions" not in body["adapt"] and all("pretrain" not in m for m in body["methods"])
