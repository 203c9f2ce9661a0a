"""The replicate config embeds run-config keys instead of re-declaring them (pretrain.run_config, a method's
pretrain.run_config), and derives the rest through one declared mapping (PRETRAIN_RUN_CONFIG)."""

from pathlib import Path

import pytest
import yaml

from tensorpoly_ds.replicate import stages
from tensorpoly_ds.replicate.config import ReplicateConfigError, load_config

BASE = {
    "variants": [{"name": "np", "mixture": "latent_skills_noprompt"}],
    "methods": [
        {"label": "LoRA", "adapter": {"method": "lora"}},
        {
            "label": "Poly",
            "adapter": {"method": "poly"},
            "pretrain": {"module_lr": 3.0e-3, "run_config": {"train.log_every": 7}},
        },
    ],
}


def _load(tmp_path, **pretrain):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "pretrain": pretrain} if pretrain else BASE))
    return load_config(path)


def _config(cfg, label):
    world = cfg.world_list()[0]
    return stages.run_config(cfg, Path("D"), Path("B"), world, cfg.method(label), Path("R"))


def test_embedded_run_config_keys_reach_the_run_config_and_the_protocol(tmp_path):
    """Mutations seen caught: the embedded keys not applied in pretrain_run_config (log_every stayed 50),
    the method's run_config applied before the shared one (log_every 3 for Poly)."""
    plain = _load(tmp_path)
    cfg = _load(tmp_path, run_config={"train.log_every": 3, "optim.weight_decay": 0.01})
    lora, poly = _config(cfg, "LoRA"), _config(cfg, "Poly")
    assert (lora["train"]["log_every"], lora["optim"]["weight_decay"]) == (3, 0.01)
    assert (poly["train"]["log_every"], poly["optim"]["module_lr"]) == (7, 3.0e-3)  # the method's wins
    assert _config(plain, "LoRA")["train"]["log_every"] == 50
    # at its default the field stays out of protocol.json and the digest (published OUTs resume); set, it is in
    assert "run_config" not in stages.protocol(plain)["pretrain"]
    assert stages.protocol(cfg)["pretrain"]["run_config"] == {"train.log_every": 3, "optim.weight_decay": 0.01}
    assert plain.digest(plain.pretrain) != cfg.digest(cfg.pretrain)


@pytest.mark.parametrize(
    "run_config, message",
    [
        ({"train.stepz": 3}, r"r\.yaml: pretrain\.run_config: unknown key 'train\.stepz'; valid keys in 'train':"),
        ({"train.steps": "many"}, r"r\.yaml: pretrain\.run_config: key 'train\.steps' = 'many': expected an integer"),
        ({"trian.steps": 3}, r"unknown section\(s\) \['trian'\]"),
        ({"data.dir": "x"}, r"key 'data\.dir' is set per run"),
        ([1], r"r\.yaml: key 'pretrain\.run_config' = \[1\]: expected a dict, got list"),
    ],
)
def test_embedded_run_config_keys_are_checked_against_the_run_config(tmp_path, run_config, message):
    """Mutation seen caught: _check_run_config not called for pretrain.run_config (the bad keys and values were
    accepted; only the list was still refused, by its type)."""
    with pytest.raises(ReplicateConfigError, match=message):
        _load(tmp_path, run_config=run_config)


def test_dotted_overrides_of_a_replicate_config(tmp_path):
    """`tensorpoly-ds replicate --config r.yaml adapt.steps=2`: the same dotted overrides as every config.
    Mutation seen caught: load_config ignoring `sets` (steps stayed 60)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_config(path, sets=["adapt.steps=2", "adapt.lrs=[1e-3]"]).adapt.lrs == [1e-3]
    assert load_config(path, sets=["adapt.steps=2"]).adapt.steps == 2
    with pytest.raises(ReplicateConfigError, match=r"r\.yaml: unknown key 'adapt\.stepz'; valid keys in 'adapt'"):
        load_config(path, sets=["adapt.stepz=2"])
