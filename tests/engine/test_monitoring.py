"""TensorBoard event files and metrics.jsonl of the baseline run (launch/pretrain.py, one process)."""

import json

import pytest

from tests.figures import assert_figure

pytestmark = pytest.mark.slow


def test_tensorboard_has_scalars_and_routing_heatmaps(baseline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(baseline_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/grad_norm",
        "lr/modules",
        "lr/routing",
        "perf/samples_per_s",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "memory/rss_mb",
        "val/loss",
        "routing_entropy/mean",
        "train/delta_ratio/mean",
        "train/delta_ratio/encoder_ffn",
        "train/adapter_grad_norm/modules",
        "train/adapter_grad_norm/routing",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    per_layer = [t for t in scalars if t.startswith("routing_entropy/") and t != "routing_entropy/mean"]
    assert len(per_layer) == 2 * 7 + 2 * 11  # tiny T5: 2 + 2 blocks, 7 / 11 projections each, one table each
    assert [e.step for e in acc.Scalars("val/loss")] == [8, 16, 24]
    lr = acc.Scalars("lr/routing")
    assert lr[0].value < max(e.value for e in lr)  # warmup
    assert acc.Scalars("lr/modules")[-1].value < max(e.value for e in acc.Scalars("lr/modules"))  # decay
    images = acc.Tags()["images"]
    assert len(images) == 2 and all(t.startswith("routing_heatmap/") for t in images)  # conftest.HEATMAPS: 2 per eval
    img = acc.Images(images[0])
    assert [e.step for e in img] == [8, 16, 24] and img[-1].width > 50 and img[-1].height > 50
    assert_figure(img[-1].encoded_image_string, min_width=50, min_height=50)


def test_metrics_jsonl_has_every_step(baseline_run):
    from .conftest import BASE_STEPS, read_metrics

    assert sorted(read_metrics(baseline_run)) == list(range(1, BASE_STEPS + 1))
    norms = read_metrics(baseline_run, key="train/grad_norm")
    assert all(v > 0 for v in norms.values())


def test_metrics_jsonl_has_adapter_health_every_step(baseline_run):
    """Poly (B = 0 at init): delta_ratio starts at 0 and grows; the module and routing gradient norms make up
    the global one (fp32, ZeRO-0: train/grad_norm is the norm of every trainable gradient). Mutation: the
    gradients read after engine.step (zeroed) -> the norms are 0 and the sum check fails."""
    from .conftest import BASE_STEPS, read_metrics

    ratio = read_metrics(baseline_run, key="train/delta_ratio/mean")
    assert sorted(ratio) == list(range(1, BASE_STEPS + 1))
    assert ratio[1] == 0.0 and ratio[BASE_STEPS] > 0
    total = read_metrics(baseline_run, key="train/grad_norm")
    modules = read_metrics(baseline_run, key="train/adapter_grad_norm/modules")
    routing = read_metrics(baseline_run, key="train/adapter_grad_norm/routing")
    for step, norm in total.items():
        assert abs((modules[step] ** 2 + routing[step] ** 2) ** 0.5 - norm) <= 1e-5 * norm, step
    groups = {
        k
        for row in map(json.loads, (baseline_run / "metrics.jsonl").read_text().splitlines())
        for k in row
        if k.startswith("train/delta_ratio/")
    }
    assert groups == {
        "train/delta_ratio/" + g
        for g in (
            "mean",
            "encoder_self_attention",
            "encoder_ffn",
            "decoder_self_attention",
            "decoder_cross_attention",
            "decoder_ffn",
        )
    }
