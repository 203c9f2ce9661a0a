"""The adapter configuration: one dataclass, validated when built."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from tpds_common.config import reject_unknown
from tpds_common.errors import ConfigError  # noqa: F401 - re-exported: adapters.ConfigError is this class

METHODS = ("lora", "tlora", "poly", "mhr", "tensorpoly_i", "tensorpoly_ii", "tensorpoly_x", "ia3")
ROUTED_METHODS = ("poly", "mhr", "tensorpoly_i", "tensorpoly_ii", "tensorpoly_x")
GRANULARITIES = ("layer", "block", "group", "model")
ROUTINGS = ("learned", "random")
GAIN_METHODS = ("tlora", "tensorpoly_i", "tensorpoly_ii")
# Fields added after configs were hashed (run fingerprints, replicate keys) and exported: to_dict leaves them out
# at these defaults, so existing configs keep their hashes and code without the field still reads the export.
LATER_DEFAULTS = {"output_gain": False}
MAX_RANDOM_GROUP = 62  # random allocations are drawn as the bit pattern of one int64

# q, k, v, o of self- and cross-attention and the FFN projections (wi for non-gated FFNs).
T5_TARGETS = r"(SelfAttention|EncDecAttention)\.(q|k|v|o)$|DenseReluDense\.(wi|wi_0|wi_1|wo)$"
# (IA)^3 rescales keys, values and the (gated) FFN hidden activation.
IA3_TARGETS = r"(SelfAttention|EncDecAttention)\.(k|v)$|DenseReluDense\.(wi_1|wi)$"


@dataclass(frozen=True)
class AdapterConfig:
    method: str = "lora"
    rank: int = 1  # LoRA rank r (columns of A, rows of B)
    alpha: float = 1.0  # LoRA scale is alpha / rank (reference: alpha = 1)
    tensor_rank: int = 1  # R: Kronecker terms (TLoRA family) or bond dimension (TensorPoly-X)
    order: int = 2  # N: Kronecker factors per column (TLoRA family) or cores (TensorPoly-X)
    skills: int = 8  # S: LoRA modules mixed by Poly / MHR
    heads: int = 1  # h: MHR routing blocks; in and out features must be divisible by h
    targets: str | None = None  # regex over module names; None = the method's default T5 set
    # Routing (Poly family). "random" = Random-mu (MHR paper): a random binary allocation per example in
    # training, the uniform average of the modules outside it; no routing parameters (docs/adapters.md).
    routing: str = "learned"
    routing_granularity: str = "layer"
    routing_group_size: int = 1  # blocks per routing table when granularity == "group"
    gumbel: bool = False  # RelaxedBernoulli noise in training (papers); the T0 configs run without
    temperature: float = 1.0
    straight_through: bool = False
    # TLoRA options.
    layernorm: bool = False  # LayerNorm on the Kronecker products (official code, orders 2 and 4)
    layernorm_affine: str = "frozen"  # "frozen" | "trainable"
    tensorpoly_ii_semantics: str = "official"  # "official" | "paper"
    init_scale: float | None = None  # override of the uniform init bound (None = reference init)
    # TLoRA / TensorPoly-I/II: a trainable scalar g (init 0) on the delta, h = W0 x + g * scale * B(A x): delta W
    # starts at 0 while d loss / d g does not (the frozen-LayerNorm factors alone fix |delta W| from step 0)
    output_gain: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"adapter config: field '{name}' = {getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"unknown method; valid methods: {', '.join(METHODS)}")
        for name in ("rank", "tensor_rank", "order", "skills", "heads", "routing_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be an integer >= 1")
        if self.routing not in ROUTINGS:
            raise bad("routing", f"valid values: {', '.join(ROUTINGS)}")
        if self.routing == "random":
            if self.method not in ROUTED_METHODS:
                raise bad(
                    "routing",
                    f"method {self.method!r} has no routing to randomise; "
                    f"random routing applies to {', '.join(ROUTED_METHODS)}",
                )
            if self.gumbel:
                raise bad("gumbel", "Gumbel noise perturbs learned routing logits; random routing has none")
            if getattr(self, self.routed_axis) > MAX_RANDOM_GROUP:
                raise bad(self.routed_axis, f"random routing draws subsets of at most {MAX_RANDOM_GROUP} modules")
        if self.routing_granularity not in GRANULARITIES:
            raise bad("routing_granularity", f"valid values: {', '.join(GRANULARITIES)}")
        if self.temperature <= 0:
            raise bad("temperature", "must be > 0")
        if self.layernorm_affine not in ("frozen", "trainable"):
            raise bad("layernorm_affine", "valid values: frozen, trainable")
        if self.tensorpoly_ii_semantics not in ("official", "paper"):
            raise bad("tensorpoly_ii_semantics", "valid values: official, paper")
        if self.layernorm and self.method in ("tlora", "tensorpoly_i", "tensorpoly_ii") and self.order not in (2, 4):
            raise bad("order", "the Kronecker LayerNorm (layernorm=true) is defined for orders 2 and 4 only")
        if self.output_gain and self.method not in GAIN_METHODS:
            raise bad("output_gain", f"only {', '.join(GAIN_METHODS)} have an output gain; method is {self.method!r}")
        if self.heads > 1 and self.method != "mhr":
            raise bad("heads", f"only MHR splits into heads; method is {self.method!r}")
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as err:
                raise bad("targets", f"not a regular expression: {err}") from None

    @property
    def routed(self) -> bool:
        return self.method in ROUTED_METHODS

    @property
    def routed_axis(self) -> str:
        """The field counting what the routing weights of one head sum over (skills, terms or orders)."""
        if self.method in ("poly", "mhr"):
            return "skills"
        if self.method == "tensorpoly_ii" and self.tensorpoly_ii_semantics == "paper":
            return "order"
        return "tensor_rank"

    @property
    def target_regex(self) -> str:
        if self.targets is not None:
            return self.targets
        return IA3_TARGETS if self.method == "ia3" else T5_TARGETS

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name, default in LATER_DEFAULTS.items():
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        reject_unknown(data, (f.name for f in dataclasses.fields(cls)), source, ConfigError)
        return cls(**data)


def int_root(d: int, n: int) -> int:
    """Smallest integer q with q**n >= d, in exact integer arithmetic (float roots miss exact powers)."""
    if d < 1 or n < 1:
        raise ValueError(f"int_root needs d >= 1 and n >= 1, got d={d}, n={n}")
    q = max(1, int(round(d ** (1.0 / n))))
    while q**n < d:
        q += 1
    while q > 1 and (q - 1) ** n >= d:
        q -= 1
    return q


__all__ = [
    "AdapterConfig",
    "ConfigError",
    "METHODS",
    "ROUTED_METHODS",
    "ROUTINGS",
    "T5_TARGETS",
    "IA3_TARGETS",
    "int_root",
]
