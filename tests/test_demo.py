"""The demo is a slice of the published protocol: same recipe, fewer methods, variants and seeds, so its
numbers are comparable with the README's. (The demo entry point itself runs end to end in
tests/replicate/test_replicate_cli.py on the CI grid.)"""

import dataclasses
from pathlib import Path

from tensorpoly_ds.replicate.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_a_slice_of_the_full_protocol():
    demo = load_config(ROOT / "configs" / "replicate" / "demo.yaml")
    full = load_config(ROOT / "configs" / "replicate" / "full.yaml")
    assert dataclasses.asdict(demo.backbone) == dataclasses.asdict(full.backbone)
    assert dataclasses.asdict(demo.pretrain) == dataclasses.asdict(full.pretrain)
    assert {k: v for k, v in dataclasses.asdict(demo.adapt).items() if k != "tasks"} == \
        {k: v for k, v in dataclasses.asdict(full.adapt).items() if k != "tasks"}
    assert set(demo.prep.seeds) <= set(full.prep.seeds) and set(demo.prep.ks) <= set(full.prep.ks)
    assert {(v.name, v.mixture) for v in demo.variants} <= {(v.name, v.mixture) for v in full.variants}
    full_methods = {m.label: m for m in full.methods}
    for m in demo.methods:
        assert m.label in full_methods
        assert (m.adapter, m.fresh) == (full_methods[m.label].adapter, full_methods[m.label].fresh)
        assert set(m.modes) <= set(full_methods[m.label].modes)
