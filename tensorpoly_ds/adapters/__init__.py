"""Adapters and routing for Hugging Face seq2seq models (one file per method family)."""

from .base import AdapterLinear
from .config import METHODS, ROUTED_METHODS, AdapterConfig, ConfigError, int_root
from .export import ExportError, adapter_parameters, export_adapters, load_adapters, read_export_meta
from .inject import (
    InjectionError,
    adapter_config,
    adapter_layers,
    adapter_param_groups,
    inject_adapters,
    register_external_routing_params,
    routing_tables,
)
from .modes import MODES, ModeError, check_mode, collapse_to_lora, merge_adapters, prepare_adaptation
from .routing import RandomRouting, RoutingError, RoutingTable, generate, routing_checkpoint_context_fn, task_routing
from .tlora import set_factor_recomputation

__all__ = [
    "AdapterConfig",
    "AdapterLinear",
    "ConfigError",
    "ExportError",
    "InjectionError",
    "METHODS",
    "MODES",
    "ModeError",
    "ROUTED_METHODS",
    "RandomRouting",
    "RoutingError",
    "RoutingTable",
    "adapter_config",
    "adapter_layers",
    "adapter_parameters",
    "adapter_param_groups",
    "check_mode",
    "collapse_to_lora",
    "export_adapters",
    "generate",
    "inject_adapters",
    "int_root",
    "load_adapters",
    "merge_adapters",
    "prepare_adaptation",
    "read_export_meta",
    "register_external_routing_params",
    "routing_checkpoint_context_fn",
    "routing_tables",
    "set_factor_recomputation",
    "task_routing",
]
