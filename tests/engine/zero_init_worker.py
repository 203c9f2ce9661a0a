"""Run by test_zero_init.py under torchrun: build the random-init tiny backbone and its adapters as
`tensorpoly-ds pretrain` does under ZeRO-3 (deepspeed.zero.Init), gather every tensor and let rank 0 write
them, with the RNG state after the build, for each precision.

argv: OUT_DIR PRECISION..."""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())

from tests.engine.test_zero_init import build_like_pretrain  # noqa: E402


def main(out_dir: str, precisions: list[str]) -> None:
    import deepspeed
    from safetensors.torch import save_file

    from tensorpoly_ds.adapters import adapter_parameters
    from tensorpoly_ds.engine import distributed as dist

    dist.init_distributed()
    world = dist.world_size()
    for precision in precisions:
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "train_batch_size": world,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": precision == "bf16"},
        }
        model, rng_after = build_like_pretrain(precision, ds_config)
        params = list(model.parameters())
        adapters = {id(p) for p in adapter_parameters(model)}  # injected after the build, partitioned later
        assert all(hasattr(p, "ds_id") for p in params if id(p) not in adapters), "not built under zero.Init"
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if dist.rank() == 0:
            state["rng_after_build"] = rng_after
            save_file(state, str(Path(out_dir) / f"{precision}.safetensors"))
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])  # init_distributed's atexit hook destroys the process group
