"""REFERENCE.md section 2 through the CLI, and the TensorPoly paper's Table 2 formulas on a small model."""

import json

import pytest

from launch.cli import main as cli_main
from tensorpoly_ds.adapters import int_root


def run(capsys, *args):
    assert cli_main(["params", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


T0_3B = [
    (["--method", "lora", "--rank", "1"], 2_211_840, 0),
    (["--method", "lora", "--rank", "16"], 35_389_440, 0),
    (["--method", "ia3"], 540_672, 0),
    (["--method", "tlora", "--rank", "16", "--tensor-rank", "1", "--order", "2"], 1_391_616, 0),
    (["--method", "poly", "--skills", "8", "--rank", "1"], 17_694_720, 313 * 8 * 432),
    (["--method", "mhr", "--skills", "8", "--heads", "64", "--rank", "1"], 17_694_720, 313 * 8 * 64 * 432),
    (["--method", "tensorpoly_i", "--rank", "16", "--tensor-rank", "8", "--order", "2"], 11_132_928, 1_081_728),
    (["--method", "tensorpoly_i", "--rank", "16", "--tensor-rank", "20", "--order", "2"], 27_832_320, 313 * 20 * 432),
    (["--method", "tensorpoly_i", "--rank", "16", "--tensor-rank", "8", "--order", "4"], 3_244_032, 1_081_728),
    (["--method", "tensorpoly_ii", "--rank", "16", "--tensor-rank", "8", "--order", "2"], 11_132_928, 313 * 16 * 432),
    (["--method", "tensorpoly_ii", "--rank", "16", "--tensor-rank", "20", "--order", "2"], 27_832_320, 313 * 40 * 432),
    (["--method", "tensorpoly_ii", "--rank", "16", "--tensor-rank", "8", "--order", "4"], 3_244_032, 313 * 32 * 432),
]


@pytest.mark.parametrize("args,modules,routing", T0_3B, ids=[" ".join(a[1::2]) for a, *_ in T0_3B])
def test_reference_counts_on_t0_3b(capsys, args, modules, routing):
    report = run(capsys, "--model", "t0-3b", "--tasks", "313", *args)
    assert report["adapted_layers"] == (432 if args[1] != "ia3" else 24 * 3 + 24 * 5)
    assert report["multi_task"]["modules"] == modules
    assert report["multi_task"]["routing"] == routing


def test_reference_totals_and_adaptation(capsys):
    poly = run(capsys, "--model", "t0-3b", "--method", "poly")
    assert poly["adaptation"]["z"] == 3_456 and poly["adaptation"]["mu_collapsed"] == 2_211_840
    mhr = run(capsys, "--model", "t0-3b", "--method", "mhr", "--heads", "64")
    assert mhr["adaptation"]["z"] == 221_184
    tp = run(
        capsys, "--model", "t0-3b", "--method", "tensorpoly_i", "--rank", "16", "--tensor-rank", "8", "--order", "4"
    )
    assert tp["multi_task"]["total"] == 4_325_760  # paper: 4.3M
    tp2 = run(capsys, "--model", "t0-3b", "--method", "tensorpoly_ii", "--rank", "16", "--tensor-rank", "20")
    assert round(tp2["multi_task"]["total"] / 1e6, 1) == 33.2


def test_t0_11b_builds_on_meta(capsys):
    report = run(capsys, "--model", "t0-11b", "--method", "lora", "--rank", "1")
    # d_model 4096, d_ff 10240: per block enc 4*8192 + 3*14336, dec 8*8192 + 3*14336
    assert report["multi_task"]["modules"] == 24 * (4 * 8192 + 3 * 14336 + 8 * 8192 + 3 * 14336)


def test_table2_formulas_on_a_small_square_model(capsys, tmp_path):
    """Table 2 assumes d_in = d_out = d: restrict to q, k, v, o of a small model."""
    config = {
        "model_type": "t5",
        "d_model": 48,
        "d_kv": 12,
        "num_heads": 4,
        "d_ff": 96,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "vocab_size": 50,
        "feed_forward_proj": "gated-gelu",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    d, r, S, T = 48, 3, 4, 7
    attn = r"(SelfAttention|EncDecAttention)\.(q|k|v|o)$"
    layers = 2 * 4 + 2 * 8
    common = ["--model", str(path), "--targets", attn, "--tasks", str(T), "--rank", str(r)]
    for N, R in [(2, 3), (3, 2), (4, 1)]:
        q = int_root(d, N)
        tlora = run(capsys, *common, "--method", "tlora", "--tensor-rank", str(R), "--order", str(N))
        assert tlora["multi_task"]["total"] == layers * 2 * N * r * q * R
        tp1 = run(capsys, *common, "--method", "tensorpoly_i", "--tensor-rank", str(R), "--order", str(N))
        assert tp1["multi_task"]["total"] == layers * (2 * N * r * q * R + T * R)
        assert tp1["adaptation"]["full"] == layers * (2 * N * r * q * R + R)
        tp2 = run(capsys, *common, "--method", "tensorpoly_ii", "--tensor-rank", str(R), "--order", str(N))
        assert tp2["multi_task"]["total"] == layers * (2 * N * r * q * R + T * R * N)
        assert tp2["adaptation"]["full"] == layers * (2 * N * r * q * R + R * N)
    lora = run(capsys, *common, "--method", "lora")
    assert lora["multi_task"]["total"] == layers * 2 * d * r
    poly = run(capsys, *common, "--method", "poly", "--skills", str(S))
    assert poly["multi_task"]["total"] == layers * (2 * d * r * S + T * S)
    assert poly["adaptation"]["full"] == layers * (2 * d * r * S + S)
