"""Statistics on finished runs: claim verdicts from paired scores (claims), routing recovery against a known
task-skill structure (recovery). The rules are written out in docs/replicate.md."""

from .claims import (
    ClaimsError,
    ClaimSpec,
    ClaimVerdict,
    Comparison,
    ComparisonVerdict,
    Verdict,
    claims_json,
    claims_markdown,
    evaluate_claims,
    load_claims,
    paired_verdict,
)
from .recovery import Recovery, plot_recovery, routing_recovery

__all__ = [
    "ClaimSpec",
    "ClaimVerdict",
    "ClaimsError",
    "Comparison",
    "ComparisonVerdict",
    "Recovery",
    "Verdict",
    "claims_json",
    "claims_markdown",
    "evaluate_claims",
    "load_claims",
    "paired_verdict",
    "plot_recovery",
    "routing_recovery",
]
