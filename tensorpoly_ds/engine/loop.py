"""The training loop: one skeleton, two backends.

    TrainLoop.loop()                 the step loop every training run goes through
      step()      -> metrics         one optimizer step (forward, backward, update) on the backend
      record(metrics)                history, the on_step hook, logging
      stop_requested() / on_stop()   a stop request (signal, time budget): checkpoint, then "requeue"
      after_step()                   periodic evaluation and checkpoint
      finish()                       final checkpoint, evaluation and export

Backends (the same skeleton, chosen by what the run needs):
  engine.trainer.Trainer        DeepSpeed: pretraining, replicate backbones, lr-search runs and adaptation jobs
                                with `trainer: engine` (ZeRO, ranks, bf16, monitor, checkpoints, export).
  adapt.local_train.LocalTrainer  plain PyTorch in this process: adaptation jobs with `trainer: local`, where
                                no DeepSpeed engine nor process group is wanted (tiny one-process jobs, a tree
                                without the engine).
Each backend keeps its own arithmetic (loss normalisation, clipping, optimizer), so that a run gives the same
numbers as before the two loops shared this skeleton.

One metrics vocabulary (keys of `history` records and of on_step's `metrics`, TensorBoard tags):
  train/loss          the step's training loss (engine: global token- or example-mean; local: mean over
                      the accumulated micro-batches)
  train/<stat>        extra statistics of the loss function, e.g. train/lm, train/mc, train/unlikelihood
  train/grad_norm     global gradient norm (local backend: only when clipping)
  lr/<group>          the learning rate this step used, per parameter group (modules, routing, base)
  val/loss            validation loss (engine, at evaluations)
  eval/<name>         the eval hook's metrics, e.g. eval/accuracy of an adaptation job
  perf/*, memory/*, train/delta_ratio/*, train/adapter_grad_norm/*   engine only (throughput, memory, health)
Result files keep their own keys (an adaptation job's result.json says "loss", "lm", ... per step).
"""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
GRAD_NORM = "train/grad_norm"


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup over warmup_ratio*total steps, then linear decay to 0 (or constant). Both backends."""
    warmup = int(round(warmup_ratio * total))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def train_key(stat: str) -> str:
    """The metrics key of a loss function's statistic ("loss" -> "train/loss", "lm" -> "train/lm")."""
    return f"train/{stat}"


def lr_key(group: str) -> str:
    return f"lr/{group}"


class TrainLoop:
    """The step loop shared by the backends. A subclass sets `step_no` (the last finished optimizer step) and
    `total_steps`, and implements `step`; the other hooks default to doing nothing."""

    step_no: int = 0
    total_steps: int = 0

    def loop(self) -> str:
        """Steps until total_steps or a stop request. Returns "done" or "requeue" (stopped, checkpointed)."""
        self.before_steps()
        while self.step_no < self.total_steps:
            metrics = self.step()
            self.record(metrics)
            if self.stop_requested():
                self.on_stop()
                return "requeue"
            self.after_step()
        self.finish()
        return "done"

    def before_steps(self) -> None:
        pass

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def record(self, metrics: dict[str, float]) -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def on_stop(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def finish(self) -> None:
        pass
