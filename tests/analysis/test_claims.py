"""Claim verdicts on constructed scores: clear effects, reversed effects, noise, equivalence, exact p-values."""

import itertools
import json

import numpy as np
import pytest

from tensorpoly_ds.analysis import (
    ClaimsError,
    Comparison,
    claims_json,
    claims_markdown,
    evaluate_claims,
    load_claims,
    paired_verdict,
)
from tensorpoly_ds.analysis.claims import bootstrap_ci, sign_flip_p_value

TASKS = ["rte", "cb", "copa", "wic"]
SEEDS = [0, 1, 2, 3, 4]


def scores(base: float, shift: float = 0.0, noise: float = 0.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {(t, s): base + 0.02 * i + shift + noise * rng.standard_normal() for i, t in enumerate(TASKS) for s in SEEDS}


def test_clear_effect_is_reproduced_and_its_reverse_contradicted():
    a, b = scores(0.6, shift=0.05, noise=0.01, seed=1), scores(0.6, noise=0.01, seed=2)
    v = paired_verdict(a, b, expect="greater")
    assert v.status == "reproduced" and v.n_pairs == 20
    assert v.effect == pytest.approx(np.mean([a[k] - b[k] for k in a]))
    assert v.ci_low > 0 and v.p_value < 0.001 and v.effect_size > 2
    assert paired_verdict(b, a, expect="greater").status == "contradicted"
    assert paired_verdict(b, a, expect="less").status == "reproduced"
    assert paired_verdict(a, b, expect="less").status == "contradicted"
    # a margin larger than the effect cannot be cleared
    assert paired_verdict(a, b, expect="greater", margin=0.2).status == "inconclusive"
    assert "reproduced" in v.summary() and "pp" in v.summary()


def test_noise_is_inconclusive():
    a, b = scores(0.6, noise=0.03, seed=3), scores(0.6, noise=0.03, seed=4)
    for expect in ("greater", "less"):
        v = paired_verdict(a, b, expect=expect)
        assert v.status == "inconclusive" and v.p_value > 0.05 and v.ci_low < 0 < v.ci_high


def test_equivalence_inside_and_outside_the_margin():
    same = paired_verdict(scores(0.6, 0.002, 0.005, 5), scores(0.6, 0, 0.005, 6), expect="equal", margin=0.02)
    assert same.status == "reproduced" and -0.02 < same.ci_low and same.ci_high < 0.02
    far = paired_verdict(scores(0.6, 0.08, 0.005, 5), scores(0.6, 0, 0.005, 6), expect="equal", margin=0.02)
    assert far.status == "contradicted" and far.ci_low >= 0.02
    b = scores(0.6)
    straddling = {k: v + 0.02 + 0.01 * (-1) ** i for i, (k, v) in enumerate(sorted(b.items()))}  # mean exactly 0.02
    unclear = paired_verdict(straddling, b, expect="equal", margin=0.02)
    assert unclear.status == "inconclusive" and unclear.ci_low < 0.02 < unclear.ci_high
    with pytest.raises(ClaimsError, match="margin > 0"):
        paired_verdict(scores(0.6), scores(0.6), expect="equal")


@pytest.mark.parametrize("n", [1, 3, 6, 9])
def test_exact_p_value_equals_brute_force_enumeration(n):
    d = np.random.default_rng(n).normal(0.01, 0.02, size=n)
    d[0] = -d[1] if n > 1 else d[0]  # ties in |sum| must count
    observed = abs(d.sum())
    hits = sum(
        abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-12 for signs in itertools.product([1, -1], repeat=n)
    )
    p, exact = sign_flip_p_value(d)
    assert exact and p == pytest.approx(hits / 2**n, abs=1e-15)


def test_random_flips_beyond_twenty_pairs_are_seeded():
    d = np.random.default_rng(0).normal(0.005, 0.02, size=30)
    p1, exact = sign_flip_p_value(d, seed=3)
    assert not exact and p1 == sign_flip_p_value(d, seed=3)[0]
    # the large-sample normal approximation of the same test: z = sum(d) / sqrt(sum(d^2))
    from math import erfc, sqrt

    z = abs(d.sum()) / sqrt((d**2).sum())
    assert p1 == pytest.approx(erfc(z / sqrt(2)), abs=0.02)


def test_bootstrap_ci_equals_a_direct_computation():
    a, b = scores(0.6, 0.01, 0.02, 7), scores(0.6, 0, 0.02, 8)
    keys = sorted(a)
    d = np.array([a[k] - b[k] for k in keys])
    rng = np.random.default_rng(11)
    means = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(10_000)]
    expected = np.quantile(means, [0.025, 0.975])
    v = paired_verdict(a, b, expect="greater", seed=11)
    assert (v.ci_low, v.ci_high) == pytest.approx(tuple(expected), abs=1e-12)
    assert bootstrap_ci(d, seed=11) == pytest.approx(tuple(expected), abs=1e-12)
    assert v.effect_size == pytest.approx(d.mean() / d.std(ddof=1))


def test_missing_pairs_are_named_or_explicitly_allowed():
    a, b = scores(0.6), scores(0.5)
    del b[("cb", 3)]
    b[("boolq", 0)] = 0.5
    with pytest.raises(ClaimsError, match=r"only in a \[\('cb', 3\)\].*only in b \[\('boolq', 0\)\]"):
        paired_verdict(a, b, expect="greater")
    v = paired_verdict(a, b, expect="greater", allow_missing=True)
    assert v.n_pairs == 19


CLAIMS_YAML = """
claims:
  - id: C1
    text: modular beats dense
    comparisons:
      - {a: "Poly (full)", b: "LoRA (full)", expect: greater}
      - {a: "MHR (full)", b: "LoRA (full)", expect: greater}
  - id: C2
    text: Random-mu about as good as LoRA
    comparisons:
      - {a: "Random-mu (mu)", b: "LoRA (full)", expect: equal, margin: 0.02}
  - id: C3
    text: needs a row nobody ran
    comparisons:
      - {a: "TensorPoly-X (full)", b: "LoRA (full)", expect: greater}
"""


def test_claims_file_evaluation_and_outputs(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text(CLAIMS_YAML)
    claims = load_claims(path)
    assert [c.id for c in claims] == ["C1", "C2", "C3"]
    assert claims[1].comparisons == [Comparison("Random-mu (mu)", "LoRA (full)", "equal", 0.02)]
    rows = {
        "LoRA (full)": scores(0.6, 0, 0.01, 1),
        "Poly (full)": scores(0.6, 0.05, 0.01, 2),
        "MHR (full)": scores(0.6, 0.0, 0.03, 3),
        "Random-mu (mu)": scores(0.6, 0.001, 0.004, 1),
    }
    verdicts = evaluate_claims(rows, claims)
    assert [v.status for v in verdicts] == ["mixed", "reproduced", "missing"]
    assert [c.status for c in verdicts[0].comparisons] == ["reproduced", "inconclusive"]
    assert "TensorPoly-X (full)" in verdicts[2].comparisons[0].detail
    rows["MHR (full)"] = scores(0.6, -0.05, 0.01, 3)
    assert evaluate_claims(rows, claims)[0].status == "contradicted"
    md = claims_markdown(verdicts)
    assert "| C1 | **mixed** |" in md and "Poly (full) > LoRA (full)" in md and "missing: no results" in md
    data = json.loads(claims_json(verdicts))
    assert data[0]["comparisons"][0]["verdict"]["status"] == "reproduced" and data[2]["status"] == "missing"


@pytest.mark.parametrize(
    "text,match",
    [
        ("claims:\n  - {id: C1, comparisons: [{a: x, b: y, expect: bigger}]}\n", "expect = 'bigger'"),
        ("claims:\n  - {id: C1, comparisons: [{a: x, b: y, margn: 0.1}]}\n", r"unknown key\(s\) \['margn'\]"),
        ("claims:\n  - {id: C1, txt: hi, comparisons: [{a: x, b: y}]}\n", r"claims\[0\]: unknown key\(s\) \['txt'\]"),
        ("claim: []\n", r"unknown key\(s\) \['claim'\]"),
        ("- {id: C1}\n", "top level must be a mapping"),
        (
            "claims:\n  - {id: C1, comparisons: [{a: x, b: y}]}\n  - {id: C1, comparisons: [{a: x, b: y}]}\n",
            "duplicate",
        ),
    ],
)
def test_bad_claims_files_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ClaimsError, match=match) as err:
        load_claims(path)
    assert str(path) in str(err.value)
