"""Backbones for the engine: a Hugging Face seq2seq name/path (pretrained) or a tensorpoly_ds.models
architecture name (random init, vocab from the manifest), then adapters injected.

Under ZeRO-3 a pretrained backbone is loaded inside deepspeed.zero.Init: an `HfDeepSpeedConfig` built from
the effective DeepSpeed config is created before `from_pretrained` and must stay alive (the returned
`keepalive`), so an 11B model is never materialised whole on each rank. Architecture names are built
normally (same seed on every rank -> same weights) unless they exceed ZERO_INIT_MIN_PARAMS parameters.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters, register_external_routing_params
from tensorpoly_ds.models import KNOWN_ARCHITECTURES, t5_config

from .config import ModelSection

log = logging.getLogger(__name__)
ZERO_INIT_MIN_PARAMS = 1_000_000_000


def _dtype(model_cfg: ModelSection, precision: str) -> torch.dtype:
    name = precision if model_cfg.dtype == "auto" else model_cfg.dtype
    return torch.bfloat16 if name == "bf16" else torch.float32


def _estimate_params(config) -> int:
    d, ff, L = config.d_model, config.d_ff, config.num_layers + config.num_decoder_layers
    return L * (4 * d * d + 3 * d * ff) + 2 * config.vocab_size * d


def build_backbone(model_cfg: ModelSection, *, vocab_size: int | None, ds_config: dict | None = None,
                   precision: str = "fp32") -> tuple[nn.Module, Any]:
    """(model, keepalive). `keepalive` (the HfDeepSpeedConfig under ZeRO-3, else None) must outlive
    deepspeed.initialize."""
    dtype = _dtype(model_cfg, precision)
    stage3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    if model_cfg.name_or_path in KNOWN_ARCHITECTURES:
        vocab = model_cfg.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("model.vocab_size is not set and no manifest gives tokenizer.vocab_size")
        config = t5_config(model_cfg.name_or_path, vocab_size=vocab, **model_cfg.arch_overrides)
        if stage3 and _estimate_params(config) >= ZERO_INIT_MIN_PARAMS:
            import deepspeed

            ctx = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            model = T5ForConditionalGeneration(config)
        return model.to(dtype), None
    keepalive = None
    if stage3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)   # makes from_pretrained use zero.Init
    model = AutoModelForSeq2SeqLM.from_pretrained(model_cfg.name_or_path, dtype=dtype)
    return model, keepalive


def prepare_model(model: nn.Module, adapter: AdapterConfig | None, num_tasks: int, *, full_finetune: bool,
                  zero_stage: int) -> nn.Module:
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
