"""Checkpoints hold what was trained (adapters, routing) and its optimizer state, never the frozen backbone;
DeepSpeed's zero_to_fp32 still reconstructs the trained tensors; FullFT checkpoints keep everything."""

import pytest
import torch
from safetensors.torch import load_file

from .conftest import VOCAB, read_metrics, run_pretrain
from .test_pretrain_runs import assert_same_trajectory

pytestmark = pytest.mark.slow


def checkpoint_tensors(tag_dir) -> dict[str, torch.Tensor]:
    """Every tensor in a tag directory's DeepSpeed files, keyed 'file.path.in.the.pickle'."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    out = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            out[path] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}.{i}")

    for f in sorted(tag_dir.glob("*.pt")):
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):  # the two classes DeepSpeed pickles
            walk(torch.load(f, map_location="cpu", weights_only=True), f.name)
    return out


def backbone_names(model_name: str) -> set[str]:
    from transformers import T5ForConditionalGeneration

    from tensorpoly_ds.models import t5_config

    with torch.device("meta"):
        model = T5ForConditionalGeneration(t5_config(model_name, vocab_size=VOCAB))
    return set(model.state_dict())


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_adapter_checkpoint_holds_no_backbone_tensor(baseline_run):
    """ZeRO-0, one process, Poly on a pretrained tiny T5 (the reference run of the engine tests)."""
    tag = baseline_run / "checkpoints" / "step_00000024"
    tensors = checkpoint_tensors(tag)
    module = {k.split(".module.", 1)[1] for k in tensors if ".module." in k and k.startswith("mp_rank_00")}
    export = load_file(str(baseline_run / "export" / "adapter_model.safetensors"))
    assert module == set(export), sorted(module ^ set(export))[:10]
    # the files hold the adapters and AdamW's two moments, nothing of the size of the backbone
    adapter_bytes = sum(t.numel() * 4 for t in export.values())
    assert storage_bytes(tensors.values()) <= 3 * adapter_bytes + 4096
    for k, t in tensors.items():
        if ".module." in k:
            torch.testing.assert_close(t, export[k.split(".module.", 1)[1]], rtol=0, atol=0)


def test_zero3_checkpoint_is_lean_and_zero_to_fp32_rebuilds_the_adapters(tmp_path, prepared_dir):
    """Two ranks, ZeRO-3, the random-init tiny architecture (built under zero.Init), TensorPoly-I with the
    official LayerNorm (frozen affines: no tensors; factors recomputed in backward from partitioned leaves)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, single = tmp_path / "z3", tmp_path / "single"
    common = [
        "adapter={method: tensorpoly_i, rank: 2, tensor_rank: 3, order: 2, layernorm: true}",
        "train.steps=4",
        "train.grad_accum=1",
        "train.eval_every=0",
        "train.save_every=2",
        "train.eval_at_end=false",
    ]
    run_pretrain(run_dir, prepared_dir, common + ["deepspeed.zero_stage=3", "train.micro_batch=2"], nproc=2)
    run_pretrain(single, prepared_dir, common + ["deepspeed.zero_stage=0", "train.micro_batch=4"])
    assert_same_trajectory(read_metrics(single), read_metrics(run_dir))  # same backbone, same training
    ckpt_dir = run_dir / "checkpoints"
    export = load_file(str(run_dir / "export" / "adapter_model.safetensors"))
    backbone = backbone_names("tiny")
    tensors = checkpoint_tensors(ckpt_dir / "step_00000004")
    assert not [k for k in tensors if k.rsplit(".", 2)[0].split(".module.")[-1] in backbone]
    adapter_bytes = sum(t.numel() * 4 for t in export.values())
    assert storage_bytes(tensors.values()) <= 3 * adapter_bytes + 16384
    for exclude in (True, False):  # without frozen fragments in the files there is nothing else to add
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir), tag="step_00000004", exclude_frozen_parameters=exclude
        )
        assert set(state) == set(export), sorted(set(state) ^ set(export))[:10]
        for k, v in export.items():  # fp32 training: the very tensors (buffers such as routing flags too)
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_full_finetune_checkpoint_keeps_every_tensor(tmp_path, prepared_dir):
    run_dir = tmp_path / "fullft"
    run_pretrain(
        run_dir,
        prepared_dir,
        [
            "adapter=null",
            "train.full_finetune=true",
            "train.steps=2",
            "train.micro_batch=2",
            "train.grad_accum=1",
            "train.eval_every=0",
            "train.eval_at_end=false",
            "train.export_at_end=false",
        ],
    )
    tensors = checkpoint_tensors(run_dir / "checkpoints" / "step_00000002")
    module = {k.split(".module.", 1)[1] for k in tensors if ".module." in k and k.startswith("mp_rank_00")}
    assert module == backbone_names("tiny")
