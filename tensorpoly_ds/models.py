"""Backbones: the T0 architectures by name (config only, for accounting), Hugging Face names or
paths, and tiny T5s built from a config for offline work."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, AutoModelForSeq2SeqLM, PretrainedConfig, T5Config, T5ForConditionalGeneration

from tpds_common.errors import ConfigError

# Shapes of bigscience/T0_3B (= google/t5-xl-lm-adapt) and bigscience/T0 (= t5-xxl-lm-adapt).
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "t0-3b": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24, num_decoder_layers=24),
    "t0-11b": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24, num_decoder_layers=24),
    # For tests and the demo on a laptop: same structure, tiny sizes.
    "tiny": dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2),
}
HUB_NAMES = {"t0-3b": "bigscience/T0_3B", "t0-11b": "bigscience/T0"}


def t5_config(name: str, vocab_size: int = 32128, **overrides) -> T5Config:
    if name not in KNOWN_ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(KNOWN_ARCHITECTURES)}")
    kwargs = dict(
        KNOWN_ARCHITECTURES[name],
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    kwargs.update(overrides)
    return T5Config(**kwargs)


def resolve_config(model: str, vocab_size: int | None = None, arch_overrides: dict | None = None) -> PretrainedConfig:
    """A config from a known architecture name (with `arch_overrides`), a known Hub name (its built-in shape, no
    download), a config.json file, or a model directory/Hub name."""
    by_hub_name = {hub: name for name, hub in HUB_NAMES.items()}
    if model in KNOWN_ARCHITECTURES or model in by_hub_name:
        kwargs = {"vocab_size": vocab_size} if vocab_size else {}
        return t5_config(by_hub_name.get(model, model), **kwargs, **(arch_overrides or {}))
    path = Path(model)
    if path.is_file():
        return AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json" else str(path))
    return AutoConfig.from_pretrained(model)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def build_meta_model(model: str | PretrainedConfig):
    """The backbone with every parameter on the meta device (no storage): an architecture or Hub name, a
    config.json or model directory, or a config."""
    from accelerate import init_empty_weights

    config = model if isinstance(model, PretrainedConfig) else resolve_config(model)
    with init_empty_weights():
        net = (
            T5ForConditionalGeneration(config)
            if config.model_type == "t5"
            else AutoModelForSeq2SeqLM.from_config(config)
        )
    net.tie_weights()  # init_empty_weights re-creates every parameter, which unties shared embeddings
    return net
