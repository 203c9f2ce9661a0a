"""Stage 1 of TensorPoly-DS: P3-style mixtures -> tokenised Arrow shards + manifest."""

from .errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError"]
