"""Runs a few real training steps of a run config with the engine (one CPU process) and prints, as JSON, the
memory training needs: the model's weights plus the peak resident memory the steps added above the built
model (gradients, optimizer states, activations, DeepSpeed's buffers).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan/measure_worker.py RUN.yaml STEPS

A fixed mmap threshold makes glibc return every tensor above 64 KiB to the system when it is freed, so the
high-water mark (VmHWM, restarted once the model is built) follows the tensors alive at the peak instead of
heap fragmentation or the start-up's and the model construction's own transient peaks.
"""

import gc
import json
import os
import sys

import torch


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def file_backed() -> int:
    return status_bytes("RssFile") + status_bytes("RssShmem")


def main(config_path: str, steps: int) -> None:
    import datasets

    from tensorpoly_ds.engine import distributed as dist
    from tensorpoly_ds.engine.config import load_run_config
    from tensorpoly_ds.engine.model import build_backbone, prepare_model
    from tensorpoly_ds.engine.trainer import DataOptions, Trainer

    cfg = load_run_config(
        [config_path],
        [
            "train.save_checkpoints=false",
            "train.export_at_end=false",
            "train.eval_at_end=false",
            "train.progress_bar=false",
            f"train.steps={steps}",
        ],
    )
    tasks = int(os.environ.get("PLAN_TASKS", "4"))
    t = cfg.train
    n = t.micro_batch * t.grad_accum
    g = torch.Generator().manual_seed(0)
    # every row exactly max_input_len / max_target_len long: batches are never padded, as the plan assumes
    rows = datasets.Dataset.from_dict(
        {
            "task_id": [i % tasks for i in range(n)],
            "input_ids": torch.randint(2, 100, (n, cfg.data.max_input_len), generator=g).tolist(),
            "target_ids": torch.randint(2, 100, (n, cfg.data.max_target_len), generator=g).tolist(),
        }
    )
    dist.init_distributed()
    # what the trainer imports lazily (TensorBoard alone is ~100 MB of RSS) is not training memory
    import deepspeed  # noqa: F401
    import tqdm  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    from transformers.optimization import Adafactor  # noqa: F401

    model, _ = build_backbone(cfg.model, vocab_size=None, precision=cfg.deepspeed.precision)
    model = prepare_model(model, cfg.adapter, tasks, full_finetune=t.full_finetune, zero_stage=cfg.deepspeed.zero_stage)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    # restart the high-water mark once the model exists (Linux >= 4.0): building it has transients of its own
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status_bytes("VmRSS") - file_backed()
    Trainer(
        model,
        rows,
        optim=cfg.optim,
        train=t,
        deepspeed=cfg.deepspeed,
        run_dir=cfg.run.dir,
        tasks=[f"task{i}" for i in range(tasks)],
        data=DataOptions(max_input_len=cfg.data.max_input_len, max_target_len=cfg.data.max_target_len),
    ).run()
    # the high-water mark counts file-backed pages too (shared libraries' code, mapped on first use and with the
    # kernel's fault-around, so more of it when another process has those pages cached); they only grow, so
    # taking their final size off the peak leaves the anonymous memory training added
    training = status_bytes("VmHWM") - file_backed() - before
    print(json.dumps({"peak_bytes": weights + training, "weights_bytes": weights, "training_bytes": training}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
