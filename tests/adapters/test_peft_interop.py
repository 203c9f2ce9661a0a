"""peft interop: `tensorpoly-ds export --format peft` loads into peft's PeftModel with identical logits, and
`tensorpoly-ds import --format peft` turns peft adapters into exports with identical logits (float32 on a tiny
T5, several tasks per batch for Poly/MHR). Unmappable configurations are refused naming the field."""

import json
import os

import pytest
import torch

# peft is optional (the `test` extra); scripts/test.sh (CI) installs it and sets TPDS_REQUIRE_OPTIONAL=1,
# so there a missing or broken peft fails instead of skipping
if os.environ.get("TPDS_REQUIRE_OPTIONAL") == "1":
    import peft
else:
    peft = pytest.importorskip("peft", reason="peft (the `test` extra) is not installed")

from transformers import T5ForConditionalGeneration  # noqa: E402

from launch.cli import main as cli_main  # noqa: E402
from launch.interop import export_main, import_main  # noqa: E402
from tensorpoly_ds.adapters import (  # noqa: E402
    AdapterConfig,
    export_adapters,
    inject_adapters,
    load_adapters,
    prepare_adaptation,
    task_routing,
)
from tensorpoly_ds.models import t5_config  # noqa: E402

TASKS = ["t0", "t1", "t2"]
IDS = torch.tensor([0, 2, 1, 2])
# float32: peft and ours compute the same products, associated differently (F.linear with A^T vs x @ A, two
# einsum orders for the skill mixing), so logits agree to rounding: |difference| <= 1e-6 x the largest |logit|.
# Measured on this tiny T5 (logits up to ~45): <= 3.5e-7 relative; the (IA)^3 export is exact (0).
RTOL = 1e-6


def assert_same_logits(got, expected):
    assert expected.abs().max() > 1, "adapters too weak to test anything"
    assert (got - expected).abs().max() <= RTOL * expected.abs().max(), float(
        (got - expected).abs().max() / expected.abs().max()
    )


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny_t5"
    T5ForConditionalGeneration(t5_config("tiny", vocab_size=100)).save_pretrained(str(path))
    return path


def fresh(backbone):
    return T5ForConditionalGeneration.from_pretrained(str(backbone)).eval()


def randomise(model, seed=1):
    """Non-zero values for every adapter tensor (B starts at zero, routing near uniform)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.dim() <= 2 and p.shape[-1] == 1 else 0))
    return model


def batch():
    gen = torch.Generator().manual_seed(2)
    return torch.randint(2, 100, (4, 7), generator=gen), torch.randint(2, 100, (4, 5), generator=gen)


def our_logits(model, routed):
    x, y = batch()
    with torch.no_grad(), task_routing(IDS if routed else 0):
        return model(input_ids=x, decoder_input_ids=y).logits


def peft_logits(model, routed):
    x, y = batch()
    with torch.no_grad():
        return model(input_ids=x, decoder_input_ids=y, **({"task_ids": IDS} if routed else {})).logits


def our_export(backbone, tmp_path, cfg, name="ours"):
    model = randomise(inject_adapters(fresh(backbone), cfg, num_tasks=len(TASKS)))
    out = export_adapters(model, tmp_path / name, TASKS, extra={"backbone": {"name_or_path": str(backbone)}})
    return model.eval(), out


EXPORTABLE = {
    "lora": AdapterConfig(method="lora", rank=2, alpha=2.0),
    "poly": AdapterConfig(method="poly", rank=2, skills=3, gumbel=True),
    "mhr": AdapterConfig(method="mhr", rank=1, skills=2, heads=4, gumbel=True),
    "ia3": AdapterConfig(method="ia3"),
}


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_loads_into_peft_with_identical_logits(backbone, tmp_path, name):
    cfg = EXPORTABLE[name]
    ours, export = our_export(backbone, tmp_path, cfg)
    assert export_main(["--format", "peft", "--adapter", str(export), "--out", str(tmp_path / "peft")]) == 0
    theirs = peft.PeftModel.from_pretrained(fresh(backbone), str(tmp_path / "peft")).eval()
    expected, got = our_logits(ours, cfg.routed), peft_logits(theirs, cfg.routed)
    assert_same_logits(got, expected)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["target_modules"] == (
        ["k", "v", "wi_1"] if name == "ia3" else ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]
    )
    # back again: the same export, bit for bit (the folder records our config and task names)
    assert import_main(["--format", "peft", "--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "back")]) == 0
    model = fresh(backbone)
    meta = load_adapters(model, tmp_path / "back")
    assert meta["tasks"] == TASKS and AdapterConfig.from_dict(meta["adapter"]) == cfg
    assert torch.equal(our_logits(model.eval(), cfg.routed), expected)


def peft_configs():
    common = dict(target_modules=["q", "v", "wi_0"], task_type="SEQ_2_SEQ_LM")
    return {
        "lora": peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0, **common),
        "poly": peft.PolyConfig(r=2, n_skills=3, n_tasks=3, n_splits=1, **common),
        "mhr": peft.PolyConfig(r=1, n_skills=2, n_tasks=3, n_splits=2, **common),
        # peft's default (IA)^3 for T5: keys, values and the input of wo (a "feedforward" module)
        "ia3": peft.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], task_type="SEQ_2_SEQ_LM"),
    }


@pytest.mark.parametrize("name", ["lora", "poly", "mhr", "ia3"])
def test_peft_adapter_imports_with_identical_logits(backbone, tmp_path, name):
    theirs = randomise(peft.get_peft_model(fresh(backbone), peft_configs()[name]))
    theirs.save_pretrained(str(tmp_path / "peft"))
    routed = name in ("poly", "mhr")
    assert (
        import_main(
            [
                "--format",
                "peft",
                "--adapter",
                str(tmp_path / "peft"),
                "--out",
                str(tmp_path / "ours"),
                *(["--tasks", ",".join(TASKS)] if routed else []),
            ]
        )
        == 0
    )
    model = fresh(backbone)
    meta = load_adapters(model, tmp_path / "ours")
    cfg = AdapterConfig.from_dict(meta["adapter"])
    assert cfg.method == name and (not routed or (cfg.gumbel and cfg.temperature == 1.0))
    expected = peft_logits(theirs.eval(), routed)
    got = our_logits(model.eval(), routed)
    # (IA)^3 on wo's input becomes wi_1's output: (g * h) * l vs g * (h * l)
    assert_same_logits(got, expected)


def refused(args, capsys, *needles):
    code = args()
    err = capsys.readouterr().err
    assert code == 2 and all(n in err for n in needles), err


@pytest.mark.parametrize(
    "cfg, needles",
    [
        (AdapterConfig(method="tensorpoly_i", rank=2, tensor_rank=2), ("'method' = 'tensorpoly_i'",)),
        (
            AdapterConfig(method="poly", skills=2, gumbel=True, routing_granularity="block"),
            ("'routing_granularity' = 'block'",),
        ),
        (AdapterConfig(method="poly", skills=2, gumbel=True, alpha=2.0), ("'alpha' = 2.0",)),
        (AdapterConfig(method="poly", skills=2), ("'gumbel' = False", "--inference-only")),
        (AdapterConfig(method="mhr", skills=2, heads=2, gumbel=True, temperature=0.5), ("'temperature' = 0.5",)),
    ],
)
def test_unmappable_exports_are_refused_naming_the_field(backbone, tmp_path, capsys, cfg, needles):
    _, export = our_export(backbone, tmp_path, cfg)
    refused(
        lambda: cli_main(["export", "--format", "peft", "--adapter", str(export), "--out", str(tmp_path / "p")]),
        capsys,
        *needles,
    )
    assert not (tmp_path / "p").exists()


def test_deterministic_routing_exports_for_inference(backbone, tmp_path, capsys):
    cfg = AdapterConfig(method="poly", skills=2)
    ours, export = our_export(backbone, tmp_path, cfg)
    assert (
        export_main(["--format", "peft", "--adapter", str(export), "--out", str(tmp_path / "p"), "--inference-only"])
        == 0
    )
    assert "'gumbel' = False" in capsys.readouterr().err
    theirs = peft.PeftModel.from_pretrained(fresh(backbone), str(tmp_path / "p")).eval()
    assert_same_logits(peft_logits(theirs, True), our_logits(ours, True))


def test_uniform_routing_is_refused(backbone, tmp_path, capsys):
    model = randomise(inject_adapters(fresh(backbone), AdapterConfig(method="poly", skills=2, gumbel=True), 3))
    prepare_adaptation(model, "mu")
    export = export_adapters(model, tmp_path / "mu", ["new"], extra={"backbone": {"name_or_path": str(backbone)}})
    refused(
        lambda: cli_main(["export", "--format", "peft", "--adapter", str(export), "--out", str(tmp_path / "p")]),
        capsys,
        "uniform",
        "collapse",
    )


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"use_rslora": True}, "'use_rslora' = True"),
        ({"use_dora": True}, "'use_dora' = True"),
        ({"bias": "all"}, "'bias' = 'all'"),
        ({"lora_dropout": 0.1}, "'lora_dropout' = 0.1"),
        ({"peft_type": "LOHA"}, "'peft_type' = 'LOHA'"),
    ],
)
def test_unmappable_peft_adapters_are_refused_naming_the_field(backbone, tmp_path, capsys, change, needle):
    theirs = randomise(peft.get_peft_model(fresh(backbone), peft_configs()["lora"]))
    theirs.save_pretrained(str(tmp_path / "peft"))
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    refused(
        lambda: cli_main(
            ["import", "--format", "peft", "--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "ours")]
        ),
        capsys,
        "adapter_config.json",
        needle,
    )
    assert not (tmp_path / "ours").exists()


def test_our_export_is_not_a_peft_folder(backbone, tmp_path, capsys):
    _, export = our_export(backbone, tmp_path, EXPORTABLE["lora"])
    refused(
        lambda: cli_main(["import", "--format", "peft", "--adapter", str(export), "--out", str(tmp_path / "x")]),
        capsys,
        "tensorpoly-ds export, not a peft adapter",
    )
