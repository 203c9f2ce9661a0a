"""Verdicts on the papers' claims from paired scores (task, seed) -> accuracy of two result rows.

    v = paired_verdict(scores["Poly (full)"], scores["LoRA (full)"], expect="greater")
    v.status, v.effect, (v.ci_low, v.ci_high), v.p_value

A comparison pairs the two rows on their common (task, seed) keys and looks at the differences d = a - b:
effect = mean(d), a seeded paired-bootstrap percentile CI of the mean (level 1 - alpha, 95 % by default),
Cohen's d_z = mean(d) / sd(d), and a two-sided sign-flip permutation p-value for mean(d) = 0 (exact over
all 2^n sign patterns for n <= 20 pairs, else 10,000 seeded random flips). The decision rules are in
docs/replicate.md and in `decide` below; claims combine comparisons by the rule in `claim_status`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tpds_common.config import read_yaml, reject_unknown
from tpds_common.errors import ConfigError

EXPECTS = ("greater", "less", "equal")
EXACT_MAX_PAIRS = 20  # up to 2^20 sign patterns are enumerated exactly
RANDOM_FLIPS = 10_000
BOOTSTRAP_RESAMPLES = 10_000


class ClaimsError(ConfigError):
    """Bad claims file or inconsistent scores; the message names the file, key or the missing pairs."""


Key = tuple[str, int]


@dataclass(frozen=True)
class Verdict:
    status: str  # reproduced | contradicted | inconclusive
    effect: float  # mean paired difference a - b (accuracy units, 0..1)
    ci_low: float  # bootstrap percentile CI of the mean difference
    ci_high: float
    effect_size: float  # Cohen's d_z = mean / sd of the differences (inf when sd = 0 and mean != 0)
    n_pairs: int
    p_value: float  # two-sided sign-flip permutation test of mean difference = 0
    expect: str = "greater"
    margin: float = 0.0
    alpha: float = 0.05
    exact: bool = True  # p-value enumerated over all sign patterns (else random flips)

    def summary(self) -> str:
        ci = f"{100 * self.ci_low:+.1f} to {100 * self.ci_high:+.1f}"
        kind = "exact" if self.exact else f"{RANDOM_FLIPS} flips"
        return (
            f"{self.status}: effect {100 * self.effect:+.1f} pp (CI {ci}), d_z {self.effect_size:+.2f}, "
            f"p {self.p_value:.3g} ({kind}), n {self.n_pairs}; expected {self.expect}"
            + (f" with margin {100 * self.margin:.1f} pp" if self.margin else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


# --- the statistics ----------------------------------------------------------------------------------------


def paired_differences(
    a: Mapping[Key, float], b: Mapping[Key, float], *, allow_missing: bool = False
) -> tuple[list[Key], np.ndarray]:
    """(sorted common keys, a - b on them). Keys present on one side only are an error naming them."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if (only_a or only_b) and not allow_missing:
        raise ClaimsError(
            f"unpaired (task, seed) keys: {len(only_a)} only in a {only_a[:10]}, "
            f"{len(only_b)} only in b {only_b[:10]} (pass allow_missing=True to pair the common keys)"
        )
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ClaimsError("no (task, seed) pair is present in both score sets")
    return keys, np.array([float(a[k]) - float(b[k]) for k in keys], dtype=np.float64)


def sign_flip_p_value(d: np.ndarray, *, seed: int = 0) -> tuple[float, bool]:
    """Two-sided p-value of mean(d) = 0 under random signs: the share of sign patterns s with
    |sum(s * d)| >= |sum(d)|. Exact (all 2^n patterns, the identity included) for n <= EXACT_MAX_PAIRS; else
    RANDOM_FLIPS seeded patterns with p = (1 + hits) / (1 + RANDOM_FLIPS). Returns (p, exact)."""
    n = len(d)
    # the identity pattern must count despite rounding
    threshold = abs(float(d.sum())) - 1e-9 * max(1.0, float(np.abs(d).sum()))
    if threshold <= 0:
        return 1.0, n <= EXACT_MAX_PAIRS
    if n <= EXACT_MAX_PAIRS:
        # meet in the middle: every signed sum is a left half's plus a right half's (2 x 2^10 sums, not 2^20)
        left, right = signed_sums(d[: n // 2]), np.sort(signed_sums(d[n // 2 :]))
        high = len(right) - np.searchsorted(right, threshold - left, side="left")  # sum >= threshold
        low = np.searchsorted(right, -threshold - left, side="right")  # sum <= -threshold
        return float((high + low).sum()) / float(1 << n), True
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(RANDOM_FLIPS, n))
    hits = int((np.abs(signs @ d) >= threshold).sum())
    return (1 + hits) / (1 + RANDOM_FLIPS), False


def signed_sums(x: np.ndarray) -> np.ndarray:
    """sum(s * x) for all 2^len(x) sign patterns s."""
    sums = np.zeros(1)
    for value in x:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def bootstrap_ci(
    d: np.ndarray, *, level: float = 0.95, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Percentile CI of the mean from `resamples` resamples of the pairs with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def cohens_dz(d: np.ndarray) -> float:
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    if len(d) > 1 and sd == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / sd


def decide(expect: str, ci_low: float, ci_high: float, p: float, margin: float, alpha: float) -> str:
    """greater: reproduced if ci_low > margin and p < alpha; contradicted if ci_high < 0 and p < alpha.
    less: mirrored. equal (equivalence within +-margin): reproduced if the CI lies inside (-margin, margin);
    contradicted if it lies entirely outside it; else inconclusive."""
    if expect == "greater":
        if ci_low > margin and p < alpha:
            return "reproduced"
        if ci_high < 0 and p < alpha:
            return "contradicted"
    elif expect == "less":
        if ci_high < -margin and p < alpha:
            return "reproduced"
        if ci_low > 0 and p < alpha:
            return "contradicted"
    else:
        if -margin < ci_low and ci_high < margin:
            return "reproduced"
        if ci_low >= margin or ci_high <= -margin:
            return "contradicted"
    return "inconclusive"


def _check_expect(expect: str, margin: float, where: str) -> None:
    if expect not in EXPECTS:
        raise ClaimsError(f"{where}: expect = {expect!r}: valid values: {', '.join(EXPECTS)}")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
        raise ClaimsError(f"{where}: margin = {margin!r}: must be a number >= 0")
    if expect == "equal" and margin <= 0:
        raise ClaimsError(f"{where}: expect 'equal' is an equivalence test and needs margin > 0")


def paired_verdict(
    a: Mapping[Key, float],
    b: Mapping[Key, float],
    *,
    expect: str,
    margin: float = 0.0,
    alpha: float = 0.05,
    seed: int = 0,
    allow_missing: bool = False,
) -> Verdict:
    """Compare row a with row b on their (task, seed) pairs; `margin` in accuracy units (0.01 = 1 point)."""
    _check_expect(expect, margin, "paired_verdict")
    if not 0 < alpha < 1:
        raise ClaimsError(f"paired_verdict: alpha = {alpha!r}: must be in (0, 1)")
    _, d = paired_differences(a, b, allow_missing=allow_missing)
    ci_low, ci_high = bootstrap_ci(d, level=1 - alpha, seed=seed)
    p, exact = sign_flip_p_value(d, seed=seed)
    return Verdict(
        status=decide(expect, ci_low, ci_high, p, margin, alpha),
        effect=float(d.mean()),
        ci_low=ci_low,
        ci_high=ci_high,
        effect_size=cohens_dz(d),
        n_pairs=len(d),
        p_value=p,
        expect=expect,
        margin=float(margin),
        alpha=alpha,
        exact=exact,
    )


# --- claims ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    a: str  # result row labels, e.g. "Poly (full)"
    b: str
    expect: str = "greater"
    margin: float = 0.0


@dataclass(frozen=True)
class ClaimSpec:
    id: str
    text: str
    comparisons: list[Comparison] = field(default_factory=list)


@dataclass(frozen=True)
class ComparisonVerdict:
    comparison: Comparison
    status: str  # reproduced | contradicted | inconclusive | missing | untestable
    verdict: Verdict | None = None
    detail: str = ""  # why a comparison is missing or untestable

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.comparison),
            "status": self.status,
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ClaimVerdict:
    claim: ClaimSpec
    status: str  # reproduced | contradicted | mixed | inconclusive | untestable | missing
    comparisons: list[ComparisonVerdict]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.claim.id,
            "text": self.claim.text,
            "status": self.status,
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


_CLAIM_KEYS = {"id", "text", "comparisons"}
_COMPARISON_KEYS = {"a", "b", "expect", "margin"}


def _mapping(obj: Any, valid: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ClaimsError(f"{where}: expected a mapping, got {type(obj).__name__}")
    reject_unknown(obj, valid, where, ClaimsError)
    return obj


def load_claims(path: str | Path) -> list[ClaimSpec]:
    """Claims from YAML: {claims: [{id, text, comparisons: [{a, b, expect, margin}]}]}."""
    data = _mapping(read_yaml(path, ClaimsError), {"claims"}, str(path)).get("claims")
    if not isinstance(data, list) or not data:
        raise ClaimsError(f"{path}: 'claims' must be a non-empty list of claims")
    claims, ids = [], set()
    for i, item in enumerate(data):
        where = f"{path}: claims[{i}]"
        _mapping(item, _CLAIM_KEYS, where)
        for key in ("id", "comparisons"):
            if key not in item:
                raise ClaimsError(f"{where}: missing key {key!r}")
        cid = str(item["id"])
        if cid in ids:
            raise ClaimsError(f"{where}: duplicate claim id {cid!r}")
        ids.add(cid)
        comps = item["comparisons"]
        if not isinstance(comps, list) or not comps:
            raise ClaimsError(f"{where} ({cid}): 'comparisons' must be a non-empty list")
        parsed = []
        for j, comp in enumerate(comps):
            cwhere = f"{where} ({cid}).comparisons[{j}]"
            _mapping(comp, _COMPARISON_KEYS, cwhere)
            for key in ("a", "b"):
                if not isinstance(comp.get(key), str) or not comp[key]:
                    raise ClaimsError(f"{cwhere}: {key!r} must name a result row (a non-empty string)")
            expect, margin = comp.get("expect", "greater"), comp.get("margin", 0.0)
            _check_expect(expect, margin, cwhere)
            parsed.append(Comparison(comp["a"], comp["b"], expect, float(margin)))
        claims.append(ClaimSpec(cid, str(item.get("text", "")), parsed))
    return claims


def claim_status(statuses: Sequence[str]) -> str:
    """missing if every comparison is missing; untestable if every comparison is untestable or missing (a row
    that did not train); reproduced if all are reproduced; contradicted if any is; mixed if some are
    reproduced and the others not; else inconclusive."""
    if all(s == "missing" for s in statuses):
        return "missing"
    if all(s in ("missing", "untestable") for s in statuses):
        return "untestable"
    if all(s == "reproduced" for s in statuses):
        return "reproduced"
    if "contradicted" in statuses:
        return "contradicted"
    if "reproduced" in statuses:
        return "mixed"
    return "inconclusive"


def evaluate_claims(
    scores: Mapping[str, Mapping[Key, float]],
    claims: Sequence[ClaimSpec],
    *,
    alpha: float = 0.05,
    seed: int = 0,
    allow_missing: bool = False,
    untestable: Mapping[str, str] | None = None,
) -> list[ClaimVerdict]:
    """One verdict per claim. A comparison whose row is absent from `scores`, or whose rows do not pair up
    (unless allow_missing), is reported as 'missing' with the reason, never dropped. A comparison involving a
    row of `untestable` (row name -> reason, e.g. its method did not train) is 'untestable': its numbers are
    still computed and shown, but it can neither reproduce nor contradict the claim."""
    untestable = untestable or {}
    out = []
    for claim in claims:
        verdicts = []
        for comp in claim.comparisons:
            absent = [row for row in (comp.a, comp.b) if row not in scores]
            if absent:
                verdicts.append(ComparisonVerdict(comp, "missing", None, f"no results for row(s) {absent}"))
                continue
            blocked = [f"{row}: {untestable[row]}" for row in (comp.a, comp.b) if row in untestable]
            try:
                v = paired_verdict(
                    scores[comp.a],
                    scores[comp.b],
                    expect=comp.expect,
                    margin=comp.margin,
                    alpha=alpha,
                    seed=seed,
                    allow_missing=allow_missing,
                )
            except ClaimsError as err:
                verdicts.append(ComparisonVerdict(comp, "missing", None, str(err)))
                continue
            if blocked:
                verdicts.append(ComparisonVerdict(comp, "untestable", v, "; ".join(blocked)))
                continue
            verdicts.append(ComparisonVerdict(comp, v.status, v))
        out.append(ClaimVerdict(claim, claim_status([v.status for v in verdicts]), verdicts))
    return out


# --- output ------------------------------------------------------------------------------------------------

_SYMBOL = {"greater": ">", "less": "<", "equal": "≈"}


def claims_markdown(verdicts: Sequence[ClaimVerdict]) -> str:
    """A claim table and a comparison table (differences in accuracy points)."""
    lines = ["| Claim | Status | Statement |", "|---|---|---|"]
    lines += [f"| {v.claim.id} | **{v.status}** | {v.claim.text} |" for v in verdicts]
    lines += [
        "",
        "| Claim | Comparison | Margin (pp) | Effect (pp) | CI (pp) | d_z | p | n | Status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        for c in v.comparisons:
            comp = c.comparison
            what = f"{comp.a} {_SYMBOL[comp.expect]} {comp.b}"
            if c.verdict is None:
                lines.append(
                    f"| {v.claim.id} | {what} | {100 * comp.margin:.1f} | — | — | — | — | 0 | "
                    f"missing: {c.detail.replace('|', '/')} |"
                )
                continue
            r = c.verdict
            lines.append(
                f"| {v.claim.id} | {what} | {100 * comp.margin:.1f} | {100 * r.effect:+.1f} | "
                f"[{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}] | {r.effect_size:+.2f} | {r.p_value:.3g} | "
                f"{r.n_pairs} | {c.status}" + (f" ({c.detail.replace('|', '/')})" if c.detail else "") + " |"
            )
    return "\n".join(lines) + "\n"


def claims_json(verdicts: Sequence[ClaimVerdict]) -> str:
    """JSON text: a list of claims with their comparisons (non-finite numbers as null)."""
    return json.dumps([v.to_dict() for v in verdicts], indent=2, allow_nan=False) + "\n"
