"""The demo is a slice of protocol v2: the same benchmark, world, methods, budgets, adaptation recipe, and each
method pretrained at the learning rates v2's search chose, with fewer rows, seeds and adaptation lrs, so its
numbers read like the README's v2 table. (The demo entry point itself runs end to end in
tests/replicate/test_replicate_cli.py, on the CI grid.)
Mutations tried: TensorPoly-I R8 at the shared module lr 1e-2 in demo.yaml (the lr check fails); demo seeds
[0, 1, 2] (not w0's seeds: fails)."""

import dataclasses
import json
from pathlib import Path

import pytest

from tensorpoly_ds.replicate.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_a_slice_of_protocol_v2():
    demo = load_config(ROOT / "configs" / "replicate" / "demo.yaml")
    v2 = load_config(ROOT / "configs" / "replicate" / "v2.yaml")
    w0 = v2.world_list()[0]

    def recipe(section, skip):
        return {k: v for k, v in dataclasses.asdict(section).items() if k not in skip}

    assert recipe(demo.backbone, {"seed"}) == recipe(v2.backbone, {"seed"}) and demo.backbone.seed == w0.backbone_seed
    v2_only = {"lr_search", "untrained_reference", "untrained_factor", "sensitivity", "seed"}
    assert recipe(demo.pretrain, v2_only) == recipe(v2.pretrain, v2_only) and demo.pretrain.seed == w0.pretrain_seed
    adapt_skip = {"lrs", "lr_search_seeds", "max_extensions", "tasks"}
    assert recipe(demo.adapt, adapt_skip) == recipe(v2.adapt, adapt_skip) and set(demo.adapt.lrs) <= set(v2.adapt.lrs)
    assert demo.prep.seeds == w0.seeds and set(demo.prep.ks) <= set(v2.prep.ks)
    assert {(v.name, v.mixture) for v in demo.variants} <= {(v.name, v.mixture) for v in v2.variants}
    v2_methods = {m.label: m for m in v2.methods}
    for m in demo.methods:
        assert (m.adapter, m.fresh) == (v2_methods[m.label].adapter, v2_methods[m.label].fresh)
        assert set(m.modes) <= set(v2_methods[m.label].modes)


@pytest.mark.parametrize("label", ["LoRA", "Poly", "TensorPoly-I R8"])
def test_demo_pretrains_at_the_learning_rates_v2_chose(label):
    demo = load_config(ROOT / "configs" / "replicate" / "demo.yaml")
    published = json.loads((ROOT / "benchmarks" / "results" / "replicate_v2" / "results.json").read_text())
    chosen = published["variants"]["noprompt"]["pretraining"]["methods"][label]["search"]["chosen"]
    recipe = demo.method_pretrain(demo.method(label))
    assert recipe["module_lr"] == chosen["module_lr"] and recipe["optimizer"] == "adamw"
    if "routing_lr" in chosen:
        assert recipe["routing_lr"] == chosen["routing_lr"]
