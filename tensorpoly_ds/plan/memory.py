"""Per-GPU memory of a training setting, by component, from facts measured on the meta device.

Bytes per parameter follow what DeepSpeed 0.19 allocates for this engine (a client optimizer handed to
`deepspeed.initialize`, templates in ds_configs/):

| component        | ZeRO-0                          | ZeRO-1            | ZeRO-2            | ZeRO-3                 |
|------------------|---------------------------------|-------------------|-------------------|------------------------|
| frozen weights   | w F                             | w F               | w F               | w (F_p + (F-F_p)/N)    |
| adapter weights  | w T                             | w T               | w T               | w (T_p + (T-T_p)/N)    |
| gradients        | w T (+ 4 T bf16 master grads)   | w T + 4 T/N       | (w + 4) T/N       | (w + 4) T/N            |
  (with optimizer offload the float32 gradient partition is on the CPU and no gradient stays on the GPU)
| optimizer states | moments (+ 4 T bf16 master)     | (4 + moments) T/N | (4 + moments) T/N | (4 + moments) T/N      |

w = 2 bytes (bf16) or 4 (fp32, bf16_autocast); F / T = frozen / trainable parameters; F_p, T_p = parameters at
or below `stage3_param_persistence_threshold`, which ZeRO-3 keeps whole on every rank; N = GPUs. Moments:
AdamW 8 bytes per element; Adafactor (no momentum) the factored second moment, row + column sums, when it sees
the real tensors (ZeRO-0 in fp32), else 4 bytes per element (ZeRO >= 1 and DeepSpeed's bf16 optimizer hand it
flat partitions). ZeRO >= 1 keeps a float32 master partition even for fp32 models. Offloaded optimizer states,
master weights and master gradients live in CPU memory; offloaded ZeRO-3 parameters too (persistent ones stay).

Buffers: ZeRO-1/2 with contiguous_gradients allocate `reduce_bucket_size` elements (twice with overlap_comm)
whatever the model size; ZeRO-3 one reduce bucket and the gathered parameters: the module being run plus the
prefetch bucket, at most `stage3_max_live_parameters`. Activations are measured (activations.py); their
backward workspace is two gradients the size of the largest saved tensor (BACKWARD_WORKSPACE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
# At the start of backward the loss's gradients w.r.t. the log-probabilities and w.r.t. the logits are alive
# together, each the size of the largest saved tensor (the float32 logits).
BACKWARD_WORKSPACE = 2


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about a model with its adapters (from the meta device)."""

    frozen_numels: tuple[int, ...]  # one entry per frozen parameter tensor
    trainable_shapes: tuple[tuple[int, ...], ...]
    largest_module: int  # parameters of the largest leaf module (ZeRO-3 gathers it whole)
    activations: dict  # activation dtype name -> ActivationProfile

    @property
    def frozen(self) -> int:
        return sum(self.frozen_numels)

    @property
    def trainable(self) -> int:
        return sum(math.prod(s) for s in self.trainable_shapes)


@dataclass(frozen=True)
class Setting:
    zero_stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    checkpointing: bool = False

    def label(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}"]
        if self.offload_optimizer:
            parts.append("offload opt")
        if self.offload_param:
            parts.append("offload param")
        if self.checkpointing:
            parts.append("ckpt")
        return " + ".join(parts)


# Cheapest first (what each step costs in time): no recomputation or communication beyond the gradient
# all-reduce, then sharding the (small) training state, then recomputing activations (about a third more
# compute), then ZeRO-3 (every weight all-gathered in forward and again in backward), then offload (PCIe
# traffic and a CPU optimizer step every step).
CANDIDATES: tuple[Setting, ...] = (
    Setting(0),
    Setting(1),
    Setting(2),
    Setting(0, checkpointing=True),
    Setting(1, checkpointing=True),
    Setting(2, checkpointing=True),
    Setting(3),
    Setting(3, checkpointing=True),
    Setting(2, offload_optimizer=True, checkpointing=True),
    Setting(3, offload_optimizer=True, checkpointing=True),
    Setting(3, offload_optimizer=True, offload_param=True, checkpointing=True),
)


@dataclass(frozen=True)
class Workload:
    precision: str  # bf16 | bf16_autocast | fp32
    optimizer: str  # adafactor | adamw


@dataclass
class Estimate:
    setting: Setting
    gpus: int
    gpu: dict[str, float]  # component -> bytes per GPU
    cpu: dict[str, float]  # component -> bytes of CPU memory per GPU (offload)

    @property
    def total(self) -> float:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())


def weight_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def activation_dtype(precision: str) -> str:
    return "fp32" if precision == "fp32" else "bf16"


def moment_bytes(facts: ModelFacts, optimizer: str, flat: bool) -> float:
    """Optimizer moments of all trainable parameters (bytes), before partitioning."""
    if optimizer == "adamw":
        return 8.0 * facts.trainable
    if flat:
        return 4.0 * facts.trainable
    total = 0
    for shape in facts.trainable_shapes:
        if len(shape) >= 2:  # transformers' Adafactor factors over the last two dimensions
            lead = math.prod(shape[:-2])
            total += lead * (shape[-2] + shape[-1])
        else:
            total += math.prod(shape)
    return 4.0 * total


def zero_config(ds_config: dict):
    """DeepSpeed's own parsing of the zero_optimization section (defaults and aliases included)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))


def estimate(facts: ModelFacts, work: Workload, setting: Setting, gpus: int, ds_config: dict) -> Estimate:
    z = zero_config(ds_config)
    n, stage, w = gpus, setting.zero_stage, weight_bytes(work.precision)
    T, F = facts.trainable, facts.frozen
    gpu: dict[str, float] = {}
    cpu: dict[str, float] = {}
    mixed = work.precision == "bf16"
    shard = n if stage >= 1 else 1

    if stage == 3:
        threshold = z.param_persistence_threshold
        f_persist = sum(x for x in facts.frozen_numels if x <= threshold)
        t_persist = sum(math.prod(s) for s in facts.trainable_shapes if math.prod(s) <= threshold)
        f_part, t_part = (F - f_persist) / n, (T - t_persist) / n
        if setting.offload_param:
            gpu["frozen weights"], gpu["adapter weights"] = w * f_persist, w * t_persist
            cpu["parameters"] = w * (f_part + t_part)
        else:
            gpu["frozen weights"], gpu["adapter weights"] = w * (f_persist + f_part), w * (t_persist + t_part)
    else:
        gpu["frozen weights"], gpu["adapter weights"] = w * F, w * T

    lp_grads = w * T / (n if stage >= 2 else 1)
    master_grads = 4 * T / shard if (mixed or stage >= 1) else 0.0
    master = 4 * T / shard if (mixed or stage >= 1) else 0.0
    moments = moment_bytes(facts, work.optimizer, flat=mixed or stage >= 1) / shard
    if setting.offload_optimizer:
        # ZeRO-Offload copies each reduced gradient bucket straight into the CPU's float32 partition
        gpu["gradients"] = 0.0
        cpu["gradients (fp32)"], cpu["optimizer states"] = master_grads, master + moments
    else:
        gpu["gradients"] = lp_grads + master_grads
        gpu["optimizer states"] = master + moments

    profile = facts.activations[activation_dtype(work.precision)]
    workspace = BACKWARD_WORKSPACE * profile.largest_tensor
    # autocast hands each frozen Linear a bf16 copy of its fp32 weight, which autograd keeps for backward
    copies = 2 * profile.linear_weights_saved if work.precision == "bf16_autocast" else 0
    if setting.checkpointing:
        # backward first runs the loss and the head with every block's input kept, then recomputes one block
        # at a time, once those have been freed
        block = profile.largest_block + copies / max(1, len(profile.blocks))
        gpu["activations"] = profile.block_inputs + max(profile.outside_blocks + workspace, block)
    else:
        gpu["activations"] = profile.without_checkpointing + copies + workspace

    buffers = 0.0
    if stage in (1, 2) and z.contiguous_gradients:
        buffers = w * z.reduce_bucket_size * (2 if z.overlap_comm else 1)
    if stage == 3:
        buffers = w * z.reduce_bucket_size
        gpu["ZeRO-3 gathered"] = w * min(z.max_live_parameters, facts.largest_module + z.prefetch_bucket_size, F + T)
    gpu["buffers"] = buffers
    return Estimate(setting, gpus, gpu, cpu)


def deepspeed_estimate(facts: ModelFacts, setting: Setting, gpus: int) -> float | None:
    """DeepSpeed's own estimator of the model states (16-bit weights and gradients, fp32 master weights and
    Adam moments) of the trainable parameters plus our frozen weights, for ZeRO-2 and ZeRO-3; None for
    ZeRO-0/1, which it does not cover."""
    if setting.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, trainable = estimate_zero2_model_states_mem_needs(
            facts.trainable, num_gpus_per_node=gpus, cpu_offload=setting.offload_optimizer
        )
        return trainable + 2 * facts.frozen
    if setting.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, trainable, _ = estimate_zero3_model_states_mem_needs(
            facts.trainable,
            facts.largest_module,
            num_gpus_per_node=gpus,
            cpu_offload=setting.offload_optimizer,
            cpu_offload_params=setting.offload_param,
        )
        return trainable + (0 if setting.offload_param else 2 * facts.frozen / gpus)
    return None


def recommend(estimates: list[Estimate], gpu_bytes: float) -> Estimate | None:
    """The first estimate (CANDIDATES order: cheapest first) whose per-GPU total fits."""
    return next((e for e in estimates if e.total <= gpu_bytes), None)
