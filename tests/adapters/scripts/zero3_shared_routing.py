"""Run by test_zero3.py under torchrun: a few DeepSpeed steps of a tiny T5 with Poly adapters whose
routing table is shared by every layer (granularity 'model'); rank 0 writes losses and the exported
adapter state so the test can compare them with a single-process run.

    zero3_shared_routing.py OUT STAGE:ROUTING [STAGE:ROUTING ...]

Each STAGE:ROUTING run (ZeRO stage; adapter routing 'learned' or 'random', or 'gain': TensorPoly-I with the
frozen LayerNorm and an output gain, learned routing) builds its own model and engine
from the same seeds and writes OUT/<stage>_<routing>/; several runs share one launch (a launch costs more
than a run)."""

import json
import os
import random
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import T5ForConditionalGeneration

sys.path.insert(0, os.getcwd())
from tensorpoly_ds.adapters import (  # noqa: E402
    AdapterConfig,
    adapter_param_groups,
    export_adapters,
    inject_adapters,
    register_external_routing_params,
    task_routing,
)
from tensorpoly_ds.models import t5_config  # noqa: E402


def train(out_dir: str, stage: int, routing: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    random.seed(1000 + rank)  # random routing draws per rank (the engine seeds every rank like this)
    model = T5ForConditionalGeneration(t5_config("tiny", vocab_size=64))
    if routing == "gain":
        cfg = AdapterConfig(
            method="tensorpoly_i", rank=2, tensor_rank=3, layernorm=True, output_gain=True, routing_granularity="model"
        )
    else:
        cfg = AdapterConfig(method="poly", skills=3, rank=2, routing_granularity="model", routing=routing)
    inject_adapters(model, cfg, num_tasks=4)
    with torch.no_grad():  # non-zero B so the routing receives gradient from the first step
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith("output_gain"):  # the gain starts at its zero init
                p.add_(0.05 * torch.randn_like(p))
    groups = adapter_param_groups(model)
    global_batch, micro = 8, 8 // world
    ds_config = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
    }
    # Plain SGD: updates are linear in the gradients, so one rank and two ranks agree to float
    # precision (Adam would amplify rounding noise in near-zero gradients).
    optimizer = torch.optim.SGD([{"params": groups["modules"], "lr": 0.5}, {"params": groups["routing"], "lr": 2.0}])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if stage == 3:
        register_external_routing_params(engine.module)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(2, 64, (global_batch, 7), generator=gen)
    y = torch.randint(2, 64, (global_batch, 5), generator=gen)
    ids = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    rows = slice(rank * micro, (rank + 1) * micro)
    losses = []
    for _ in range(4):
        with task_routing(ids[rows]):
            loss = engine(input_ids=x[rows], labels=y[rows]).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    gather = None
    if stage == 3:
        gather = lambda: deepspeed.zero.GatheredParameters(list(engine.module.parameters()))  # noqa: E731
    with gather() if gather else torch.no_grad():
        if rank == 0:
            export_adapters(engine.module, out_dir, tasks=["a", "b", "c", "d"])
    if rank == 0:
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump(losses, f)
    dist.barrier()


def main(out_dir: str, *runs: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    for run in runs:
        stage, routing = run.split(":")
        train(os.path.join(out_dir, f"{stage}_{routing}"), int(stage), routing)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
    from tensorpoly_ds.engine.distributed import shutdown_distributed

    shutdown_distributed()  # the group came from deepspeed, not init_distributed, whose atexit hook does this
