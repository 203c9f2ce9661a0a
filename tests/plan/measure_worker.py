"""Runs a few real training steps of a run config with the engine (one CPU process) and prints, as JSON, the
peak resident memory above the process's footprint before the model was built: what training allocated.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan/measure_worker.py RUN.yaml STEPS

A fixed mmap threshold makes glibc return every tensor above 64 KiB to the system when it is freed, so the
high-water mark (VmHWM) follows the tensors alive at the peak instead of heap fragmentation.
"""

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


def main(config_path: str, steps: int) -> None:
    import datasets

    from tensorpoly_ds.engine import distributed as dist
    from tensorpoly_ds.engine.config import load_run_config
    from tensorpoly_ds.engine.model import build_backbone, prepare_model
    from tensorpoly_ds.engine.trainer import train

    cfg = load_run_config([config_path], ["train.save_checkpoints=false", "train.export_at_end=false",
                                          "train.eval_at_end=false", "train.progress_bar=false", f"train.steps={steps}"])
    tasks = int(os.environ.get("PLAN_TASKS", "4"))
    t = cfg.train
    n = t.micro_batch * t.grad_accum
    g = torch.Generator().manual_seed(0)
    # every row exactly max_input_len / max_target_len long: batches are never padded, as the plan assumes
    rows = datasets.Dataset.from_dict({
        "task_id": [i % tasks for i in range(n)],
        "input_ids": torch.randint(2, 100, (n, cfg.data.max_input_len), generator=g).tolist(),
        "target_ids": torch.randint(2, 100, (n, cfg.data.max_target_len), generator=g).tolist()})
    dist.init_distributed()
    before = status_bytes("VmRSS")
    model, _ = build_backbone(cfg.model, vocab_size=None, precision=cfg.deepspeed.precision)
    model = prepare_model(model, cfg.adapter, tasks, full_finetune=t.full_finetune, zero_stage=cfg.deepspeed.zero_stage)
    train(model, rows, optim=cfg.optim, train=t, deepspeed=cfg.deepspeed, run_dir=cfg.run.dir,
          tasks=[f"task{i}" for i in range(tasks)], max_input_len=cfg.data.max_input_len,
          max_target_len=cfg.data.max_target_len)
    print(json.dumps({"peak_bytes": status_bytes("VmHWM") - before}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
