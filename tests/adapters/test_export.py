"""Exported adapters reload into a fresh model with identical outputs; bad exports are refused."""

import json

import pytest
import torch

from tensorpoly_ds.adapters import (
    AdapterConfig,
    ExportError,
    export_adapters,
    inject_adapters,
    load_adapters,
    task_routing,
)
from tests.adapters.test_behaviour import ALL, cfg_for
from tests.conftest import tiny_t5


def trained(key):
    torch.manual_seed(1)
    model = tiny_t5()
    inject_adapters(model, cfg_for(key), num_tasks=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("key", list(ALL))
def test_export_reloads_to_identical_outputs(key, tmp_path):
    model = trained(key)
    export_adapters(model, tmp_path, tasks=["a", "b", "c"])
    torch.manual_seed(1)
    fresh = tiny_t5()  # same seed: the same backbone, as a real checkpoint would be; adapters come from the export
    meta = load_adapters(fresh, tmp_path)
    assert meta["tasks"] == ["a", "b", "c"]
    x = torch.randint(2, 64, (3, 6))
    y = torch.randint(2, 64, (3, 4))
    with task_routing(torch.tensor([2, 0, 1])):
        torch.testing.assert_close(fresh(input_ids=x, labels=y).logits, model(input_ids=x, labels=y).logits)


def test_corrupt_and_mismatched_exports_are_refused(tmp_path):
    model = trained("poly")
    export_adapters(model, tmp_path, tasks=["a", "b", "c"])
    other = tiny_t5()
    inject_adapters(other, AdapterConfig(method="poly", skills=5), num_tasks=3)
    with pytest.raises(ExportError, match="skills: 5 vs 3"):
        load_adapters(other, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExportError, match="adapter_model.safetensors"):
        load_adapters(tiny_t5(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ExportError, match="adapter_config.json"):
        load_adapters(tiny_t5(), tmp_path)
    meta = tmp_path / "adapter_config.json"
    meta.write_text(json.dumps({"format": 99}))
    with pytest.raises(ExportError, match="'format' = 99"):
        load_adapters(tiny_t5(), tmp_path)
