"""Backbones for the engine: a Hugging Face seq2seq name/path (pretrained) or a tensorpoly_ds.models
architecture name (random init, vocab from the manifest), then adapters injected.

Under ZeRO-3 a backbone is never materialised whole on each rank: a pretrained one is loaded inside
deepspeed.zero.Init (an `HfDeepSpeedConfig` built from the effective DeepSpeed config is created before
`from_pretrained` and must stay alive: the returned `keepalive`); an architecture name is built inside
deepspeed.zero.Init with its init run on gathered partitions (`hf_init_on_gathered_partitions`), so that it
holds exactly the weights a normal build with the same seed holds, which is what adaptation rebuilds from the export's
recorded seed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters, register_external_routing_params
from tensorpoly_ds.models import KNOWN_ARCHITECTURES, t5_config
from tpds_common.errors import ConfigError

from .config import ModelSection


def _dtype(model_cfg: ModelSection, precision: str) -> torch.dtype:
    name = precision if model_cfg.dtype == "auto" else model_cfg.dtype
    return torch.bfloat16 if name == "bf16" else torch.float32


@contextlib.contextmanager
def _as_fp32(params: list[nn.Parameter]):
    """The parameters hold fp32 copies inside, written back (rounded) on exit: the init draws and computes in
    fp32, as a normal build does before its cast (normal_ on bf16 storage draws the same numbers but rounds
    intermediate results differently)."""
    kept = [p.data for p in params]
    for p in params:
        p.data = p.data.float()
    try:
        yield
    finally:
        for p, data in zip(params, kept):
            data.copy_(p.data)
            p.data = data


@contextlib.contextmanager
def hf_init_on_gathered_partitions():
    """Inside deepspeed.zero.Init, make a Hugging Face model's own weight init take effect, drawing exactly
    what a normal build draws.

    Under zero.Init each submodule's parameters are partitioned as soon as its constructor returns, so the
    init that Hugging Face runs at the end of every (sub)model's constructor (post_init, interleaved with the
    construction: T5's encoder is initialised before its decoder is built) would write into empty partitions:
    nothing drawn, nothing written, PyTorch's default init left in place. The constructors' own default inits
    draw the same numbers either way. So, for the duration, each module's init runs on gathered fp32 tensors
    of its own and its direct children's parameters (T5's init of an attention or FFN block writes its
    q/k/v/o or wi/wo children; the model's writes its shared and lm_head embeddings), at its normal place in
    the sequence, and rank 0's result is kept: every tensor, and the RNG state after the build, are those of
    a normal build with the same seed, at the memory of one module."""
    import deepspeed
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def gathered(self, module: nn.Module, is_custom_code: bool = False):
        if getattr(module, "_is_hf_initialized", False):
            return
        params = list({id(p): p for m in (module, *module.children()) for p in m.parameters(recurse=False)}.values())
        if not params:
            return original(self, module, is_custom_code)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), _as_fp32(params):
            return original(self, module, is_custom_code)

    PreTrainedModel._initialize_weights = gathered
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


def build_backbone(
    model_cfg: ModelSection, *, vocab_size: int | None, ds_config: dict | None = None, precision: str = "fp32"
) -> tuple[nn.Module, Any]:
    """(model, keepalive). `keepalive` (the HfDeepSpeedConfig under ZeRO-3, else None) must outlive
    deepspeed.initialize."""
    dtype = _dtype(model_cfg, precision)
    stage3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    if model_cfg.name_or_path in KNOWN_ARCHITECTURES:
        vocab = model_cfg.vocab_size or vocab_size
        if vocab is None:
            raise ConfigError("model.vocab_size is not set and no manifest gives tokenizer.vocab_size")
        config = t5_config(model_cfg.name_or_path, vocab_size=vocab, **model_cfg.arch_overrides)
        if not stage3:
            return T5ForConditionalGeneration(config).to(dtype), None
        import deepspeed

        # The dtype comes from the config's bf16 flag: zero.Init's own `dtype` argument is ignored whenever the
        # accelerator lacks fp16 (DeepSpeed 0.19's operator precedence: dtype=float32 gives bf16 on the CPU).
        init_config = dict(ds_config, bf16={"enabled": dtype == torch.bfloat16}, fp16={"enabled": False})
        with deepspeed.zero.Init(config_dict_or_path=init_config), hf_init_on_gathered_partitions():
            model = T5ForConditionalGeneration(config)
        return model, None
    keepalive = None
    if stage3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained use zero.Init
    model = AutoModelForSeq2SeqLM.from_pretrained(model_cfg.name_or_path, dtype=dtype)
    return model, keepalive


def prepare_model(
    model: nn.Module, adapter: AdapterConfig | None, num_tasks: int, *, full_finetune: bool, zero_stage: int
) -> nn.Module:
    """Inject adapters (or unfreeze everything for a full fine-tune); register the shared routing tables
    as external parameters under ZeRO-3."""
    if full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    inject_adapters(model, adapter, num_tasks)
    if zero_stage == 3 and adapter.routed:
        register_external_routing_params(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing whose recomputation re-enters the forward's task routing."""
    from tensorpoly_ds.adapters import routing_checkpoint_context_fn

    kwargs = {"use_reentrant": False, "context_fn": routing_checkpoint_context_fn}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
