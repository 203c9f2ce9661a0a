"""Stage 2: multi-task pretraining on DeepSpeed (config, launcher env, data, checkpoints, training loop)."""

from .config import RunConfig, RunConfigError, load_run_config, save_run_config
from .trainer import REQUEUE_EXIT_CODE, TrainHooks, TrainResult, train

__all__ = ["REQUEUE_EXIT_CODE", "RunConfig", "RunConfigError", "TrainHooks", "TrainResult", "load_run_config",
           "save_run_config", "train"]
