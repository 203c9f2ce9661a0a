"""Memory planning: per-GPU memory by component for a training setting, measured on the meta device."""

from .activations import ActivationProfile, profile_activations
from .memory import CANDIDATES, Estimate, ModelFacts, Setting, Workload, deepspeed_estimate, estimate, recommend

__all__ = [
    "ActivationProfile",
    "CANDIDATES",
    "Estimate",
    "ModelFacts",
    "Setting",
    "Workload",
    "deepspeed_estimate",
    "estimate",
    "profile_activations",
    "recommend",
]
