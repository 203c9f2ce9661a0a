"""The demo is a slice of the published protocol: the same benchmark, methods, adaptation recipe and
learning rates, with fewer of them and shorter runs, so its numbers read like the README's. (The demo entry
point itself runs end to end in tests/replicate/test_replicate_cli.py, on the CI grid.)"""

import dataclasses
from pathlib import Path

from tensorpoly_ds.replicate.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_a_slice_of_the_full_protocol():
    demo = load_config(ROOT / "configs" / "replicate" / "demo.yaml")
    full = load_config(ROOT / "configs" / "replicate" / "full.yaml")

    def recipe(section, budget):
        return {k: v for k, v in dataclasses.asdict(section).items() if k not in budget}

    assert recipe(demo.backbone, {"steps", "eval_every"}) == recipe(full.backbone, {"steps", "eval_every"})
    assert demo.backbone.steps <= full.backbone.steps and demo.pretrain.steps <= full.pretrain.steps
    assert recipe(demo.pretrain, {"steps", "eval_every"}) == recipe(full.pretrain, {"steps", "eval_every"})
    assert recipe(demo.adapt, {"lrs", "lr_search_seeds", "tasks"}) == recipe(full.adapt, {"lrs", "lr_search_seeds", "tasks"})
    assert set(demo.adapt.lrs) <= set(full.adapt.lrs)
    assert set(demo.prep.seeds) <= set(full.prep.seeds) and set(demo.prep.ks) <= set(full.prep.ks)
    assert {(v.name, v.mixture) for v in demo.variants} <= {(v.name, v.mixture) for v in full.variants}
    full_methods = {m.label: m for m in full.methods}
    for m in demo.methods:
        assert (m.adapter, m.fresh) == (full_methods[m.label].adapter, full_methods[m.label].fresh)
        assert set(m.modes) <= set(full_methods[m.label].modes)
