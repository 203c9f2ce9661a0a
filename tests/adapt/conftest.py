import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A real prepared directory (data_prep, embedded mixture: 16 train tasks, 3 held-out, k=4)."""
    out = tmp_path_factory.mktemp("data") / "emb"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--mixture",
            "embedded",
            "--source",
            "embedded",
            "--tokenizer",
            "embedded",
            "--out",
            str(out),
            "--cap-per-template",
            "20",
            "--val-per-template",
            "2",
            "--few-shot-k",
            "4",
            "--num-shards",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def make_export(prepared, directory, method="poly", **adapter):
    """A 'pretrained' export on the tiny backbone the jobs build (model tiny, default seed 42), with
    non-zero random modules and routing so that adaptation starts from something non-trivial."""
    from data_prep.manifest import read_manifest
    from tensorpoly_ds.adapt.job import AdaptJob, build_backbone
    from tensorpoly_ds.adapters import AdapterConfig, export_adapters, inject_adapters

    m = read_manifest(prepared)
    job = AdaptJob(out_dir="unused", data_dir=str(prepared), task=m.held_out[0], export="unused")
    model = build_backbone(job, m.tokenizer["vocab_size"])
    inject_adapters(model, AdapterConfig(method=method, **adapter), num_tasks=len(m.tasks))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    export_adapters(model, directory, m.tasks)
    return Path(directory)


@pytest.fixture(scope="session")
def poly_export(prepared, tmp_path_factory):
    return make_export(prepared, tmp_path_factory.mktemp("exports") / "poly", "poly", skills=3)
