"""TensorBoard event files and metrics.jsonl of the baseline run (launch/pretrain.py, one process)."""

import pytest

from tests.figures import assert_figure

pytestmark = pytest.mark.slow


def test_tensorboard_has_scalars_and_routing_heatmaps(baseline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(baseline_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "lr/modules", "lr/routing", "perf/samples_per_s",
                "perf/tokens_per_s", "perf/step_time_s", "memory/rss_mb", "val/loss", "routing_entropy/mean"):
        assert tag in scalars, (tag, sorted(scalars))
    per_layer = [t for t in scalars if t.startswith("routing_entropy/") and t != "routing_entropy/mean"]
    assert len(per_layer) == 2 * 7 + 2 * 11   # tiny T5: 2 + 2 blocks, 7 / 11 projections each, one table each
    assert [e.step for e in acc.Scalars("val/loss")] == [8, 16, 24]
    lr = acc.Scalars("lr/routing")
    assert lr[0].value < max(e.value for e in lr)          # warmup
    assert acc.Scalars("lr/modules")[-1].value < max(e.value for e in acc.Scalars("lr/modules"))   # decay
    images = acc.Tags()["images"]
    assert len(images) == 2 and all(t.startswith("routing_heatmap/") for t in images)   # conftest.HEATMAPS: 2 per eval
    img = acc.Images(images[0])
    assert [e.step for e in img] == [8, 16, 24] and img[-1].width > 50 and img[-1].height > 50
    assert_figure(img[-1].encoded_image_string, min_width=50, min_height=50)


def test_metrics_jsonl_has_every_step(baseline_run):
    from .conftest import BASE_STEPS, read_metrics

    assert sorted(read_metrics(baseline_run)) == list(range(1, BASE_STEPS + 1))
    norms = read_metrics(baseline_run, key="train/grad_norm")
    assert all(v > 0 for v in norms.values())
