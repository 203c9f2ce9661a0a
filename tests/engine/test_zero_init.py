"""A random-init backbone built under deepspeed.zero.Init (ZeRO-3) holds exactly the tensors of a normal
build with the same seed, on 1 and on 2 ranks: what adaptation rebuilds from the export's recorded seed."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpds_common.net import free_port

from .conftest import REPO, child_env

WORKER = Path(__file__).with_name("zero_init_worker.py")
SEED, VOCAB = 11, 96
ADAPTER = dict(method="tensorpoly_i", rank=2, tensor_rank=3, order=2, layernorm=True)


def build_like_pretrain(precision: str, ds_config: dict | None):
    """launch/pretrain.py's build: seed, backbone, adapters. Returns (model, RNG state after the backbone)."""
    from tensorpoly_ds.adapters import AdapterConfig
    from tensorpoly_ds.engine.checkpoint import seed_all
    from tensorpoly_ds.engine.config import ModelSection
    from tensorpoly_ds.engine.model import build_backbone, prepare_model

    seed_all(SEED)
    model, _ = build_backbone(
        ModelSection(name_or_path="tiny"), vocab_size=VOCAB, ds_config=ds_config, precision=precision
    )
    rng_after = torch.get_rng_state()
    stage = 3 if ds_config else 0
    model = prepare_model(model, AdapterConfig(**ADAPTER), num_tasks=4, full_finetune=False, zero_stage=stage)
    return model, rng_after


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_zero_init_build_equals_a_normal_build(ranks, tmp_path):
    from safetensors.torch import load_file

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(tmp_path),
        "fp32",
        "bf16",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for precision in ("fp32", "bf16"):
        zero3 = load_file(str(tmp_path / f"{precision}.safetensors"))
        model, rng_after = build_like_pretrain(precision, None)
        normal = dict(model.state_dict(), rng_after_build=rng_after)
        assert sorted(zero3) == sorted(normal)
        differ = [k for k in normal if not torch.equal(zero3[k], normal[k])]
        assert not differ, f"{precision}: {len(differ)} of {len(normal)} tensors differ: {differ[:5]}"
