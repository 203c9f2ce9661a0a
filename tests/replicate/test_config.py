"""The replicate config is validated before anything runs; the shipped configs load."""

import json
from pathlib import Path

import pytest
import yaml

from tensorpoly_ds.replicate.config import ReplicateConfigError, load_config
from tensorpoly_ds.replicate.run import ProtocolMismatch, check_protocol
from tensorpoly_ds.replicate.stages import adaptation_rows

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs" / "replicate").glob("*.yaml"))
MINIMAL = {
    "variants": [{"name": "np", "mixture": "latent_skills_noprompt"}],
    "methods": [{"label": "LoRA", "adapter": {"method": "lora"}}],
}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", [p for p in SHIPPED if not p.name.startswith("claims")], ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.claims_path() is None or cfg.claims_path().is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, "unknown key(s) ['bogus']"),
        ({"adapt": {"steps": 10, "lr": 0.1}}, "unknown key 'adapt.lr'"),
        ({"adapt": {"lrs": []}}, "adapt.lrs"),
        ({"prep": {"ks": [0]}}, "prep.ks"),
        ({"variants": [{"name": "a", "mixture": "nope"}]}, "unknown mixture 'nope'"),
        ({"methods": [{"label": "X", "adapter": {"method": "lorax"}}]}, "unknown method"),
        ({"methods": [{"label": "X", "adapter": {"method": "lora"}, "modes": ["z"]}]}, "not applicable"),
        ({"methods": [{"label": "X"}]}, "exactly one of 'adapter'"),
        (
            {"methods": [{"label": "X", "adapter": {"method": "lora"}}, {"label": "X", "fresh": {"method": "fullft"}}]},
            "duplicate labels",
        ),
        ({"zero_shot": {"variants": ["np"], "methods": ["FullFT"]}}, "not a pretrained method"),
        ({"claims": "missing.yaml"}, "not found"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, change, message):
    with pytest.raises(ReplicateConfigError, match=None) as err:
        load_config(_write(tmp_path, {**MINIMAL, **change}))
    assert message in str(err.value) and "r.yaml" in str(err.value)


def test_a_different_protocol_is_refused_in_the_same_out(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL))
    check_protocol(cfg, tmp_path / "out")
    check_protocol(cfg, tmp_path / "out")  # same protocol: fine
    cfg.adapt.steps += 1
    with pytest.raises(ProtocolMismatch, match="adapt"):
        check_protocol(cfg, tmp_path / "out")
    cfg.adapt.steps -= 1
    cfg.workers = 7  # not part of the protocol
    check_protocol(cfg, tmp_path / "out")


def test_rows_cover_the_grid_with_the_same_lrs_for_every_method(tmp_path, monkeypatch):
    from tensorpoly_ds.replicate import stages

    cfg = load_config(ROOT / "configs" / "replicate" / "full.yaml")
    manifest_tasks = ["t1", "t2"]
    monkeypatch.setattr(stages, "variant_tasks", lambda cfg, out, variant: manifest_tasks)  # no prepared data here
    exports = {}
    for m in cfg.methods:
        if m.is_pretrained():  # expand_grid reads the method from the export's metadata
            exports[m.label] = tmp_path / "exports" / m.label
            exports[m.label].mkdir(parents=True)
            (exports[m.label] / "adapter_config.json").write_text(json.dumps({"format": 1, "adapter": m.adapter}))
    search = cfg.search_seeds()
    for variant in cfg.variants:
        rows = adaptation_rows(cfg, tmp_path, variant, tmp_path / "bb", exports)
        few = [r["job"] for r in rows if r["job"]["k"] != 0]
        per_row = {}
        for j in few:
            per_row.setdefault((j["label"], j["mode"]), set()).add((j["lr"], j["k"], j["seed"], j["task"]))
        expected = {(lr, k, s, t) for lr in cfg.adapt.lrs for k in cfg.prep.ks for s in search for t in manifest_tasks}
        assert per_row and all(v == expected for v in per_row.values())
        assert len({j["steps"] for j in few}) == 1 and len({j["batch_size"] for j in few}) == 1
        assert len({r["job"]["out_dir"] for r in rows}) == len(rows)
        assert {lab for lab, _ in per_row} == {m.label for m in cfg.methods_for(variant.name)}
        assert {mode for _, mode in per_row} <= set(variant.modes or ["full", "z", "mu"])
        # phase 2: every seed at the chosen lr only; the search seeds' jobs are the same directories
        chosen = {
            (f"{lab} ({mode})", k): cfg.adapt.lrs[i % len(cfg.adapt.lrs)]
            for i, (lab, mode) in enumerate(sorted(per_row))
            for k in cfg.prep.ks
        }
        second = adaptation_rows(cfg, tmp_path, variant, tmp_path / "bb", exports, chosen)
        for r in second:
            j = r["job"]
            assert j["lr"] == chosen[(f"{j['label']} ({j['mode']})", j["k"])]
        assert len(second) == len(chosen) * len(manifest_tasks) * len(cfg.prep.seeds)
        first_dirs = {r["job"]["out_dir"] for r in rows}
        assert sum(r["job"]["out_dir"] in first_dirs for r in second) == len(chosen) * len(manifest_tasks) * len(search)
