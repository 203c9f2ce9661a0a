"""Run by test_zero3.py under torchrun (or alone): rank-classify a fixed set with a fixed tiny model.

argv: OUT_JSON ZERO_STAGE ("none" = plain model, no DeepSpeed)."""

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters, register_external_routing_params  # noqa: E402
from tensorpoly_ds.evaluation import evaluate  # noqa: E402
from tests.conftest import tiny_t5  # noqa: E402
from tests.evaluation.test_rank_classification import make_rows  # noqa: E402


def build():
    torch.manual_seed(123)
    model = tiny_t5(64)
    inject_adapters(model, AdapterConfig(method="poly", skills=3, init_scale=0.3), num_tasks=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name or "logits" in name:
                p.normal_(0, 0.5)
    return model.eval()


def main(out, stage):
    rows = make_rows(13, seed=7)  # 13 examples: uneven over 2 ranks, last batch padded
    model = build()
    if stage != "none":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": int(stage)},
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
        }
        register_external_routing_params(model)  # shared routing tables (REFERENCE pitfall 4)
        model, *_ = deepspeed.initialize(model=model, config=config)
        model.eval()
    records = evaluate(model, rows, batch_size=3, length_norm=1.0, task_id=1, device=torch.device("cpu"))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "records": records,
                    "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                },
                f,
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from tensorpoly_ds.engine.distributed import shutdown_distributed

    shutdown_distributed()  # the group came from deepspeed, not init_distributed, whose atexit hook does this
