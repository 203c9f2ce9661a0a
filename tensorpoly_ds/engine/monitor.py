"""Rank-0 monitoring: TensorBoard (RUN_DIR/tb), metrics.jsonl, routing entropy and heatmaps, gradient
alignment, memory."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch


def memory_mb(device: torch.device) -> dict[str, float]:
    out = {}
    try:
        with open("/proc/self/statm") as fh:
            out["memory/rss_mb"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        out["memory/rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["memory/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def routing_weights(tables: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per routing table: the eval-mode weights of every task [tasks, heads, skills] (call inside a gather
    of the logits under ZeRO-3, on every rank)."""
    out = {}
    for name, table in tables.items():
        with torch.no_grad():
            was = table.training
            table.eval()
            ids = torch.arange(table.num_tasks, device=table.logits.device)
            out[name] = table.weights(ids).float().cpu()
            table.train(was)
    return out


def entropy(weights: torch.Tensor, dim: int = -1) -> float:
    """Mean entropy (nats) of the normalised weights over `dim`."""
    p = weights.clamp_min(1e-12)
    p = p / p.sum(dim=dim, keepdim=True)
    return float((-(p * p.log()).sum(dim=dim)).mean())


def heatmap_figure(weights: torch.Tensor, title: str, tasks: list[str] | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = weights.mean(dim=1).numpy()  # tasks x skills (heads averaged)
    fig, ax = plt.subplots(
        figsize=(max(6.0, min(4 + 0.4 * w.shape[1], 14)), max(3.0, min(1.5 + 0.25 * w.shape[0], 20)))
    )
    im = ax.imshow(w, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("module (skill / expert)")
    ax.set_ylabel("task")
    if tasks and len(tasks) <= 40:
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(tasks, fontsize=6)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def alignment_figure(matrix: torch.Tensor, tasks: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * n, 2 + 0.4 * n))
    im = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=6)
    ax.set_yticklabels(tasks, fontsize=6)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


class Monitor:
    """No-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def routing(self, step: int, weights: dict[str, torch.Tensor], tasks: list[str], max_images: int) -> None:
        if not self.enabled or not weights:
            return
        ents = {f"routing_entropy/{name}": entropy(w) for name, w in weights.items()}
        ents["routing_entropy/mean"] = sum(ents.values()) / len(ents)
        self.scalars(step, ents, kind="routing")
        if self.writer is None or max_images <= 0:
            return
        names = list(weights)
        if len(names) > max_images:
            stride = (len(names) - 1) / (max_images - 1) if max_images > 1 else 0
            names = [names[round(i * stride)] for i in range(max_images)]
        import matplotlib.pyplot as plt

        for name in names:
            fig = heatmap_figure(weights[name], f"{name} (step {step})", tasks)
            self.writer.add_figure(f"routing_heatmap/{name}", fig, step, close=True)
            plt.close(fig)

    def grad_alignment(self, step: int, tasks: list[str], matrix: torch.Tensor, seconds: float) -> None:
        """TensorBoard: the heatmap and grad_alignment/mean_offdiag; metrics.jsonl: the whole matrix."""
        if not self.enabled:
            return
        from .grad_alignment import mean_offdiag

        mean = mean_offdiag(matrix)
        if self.writer is not None:
            self.writer.add_scalar("grad_alignment/mean_offdiag", mean, step)
            self.writer.add_scalar("perf/grad_alignment_s", seconds, step)
            import matplotlib.pyplot as plt

            fig = alignment_figure(matrix, tasks, f"gradient cosine similarity (step {step})")
            self.writer.add_figure("grad_alignment/matrix", fig, step, close=True)
            plt.close(fig)
        self.jsonl.write(
            json.dumps(
                {
                    "kind": "grad_alignment",
                    "step": step,
                    "grad_alignment/mean_offdiag": mean,
                    "perf/grad_alignment_s": seconds,
                    "tasks": tasks,
                    "matrix": [[round(float(v), 6) for v in row] for row in matrix],
                }
            )
            + "\n"
        )

    def text(self, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def flush(self) -> None:
        if self.enabled and self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            if self.writer is not None:
                self.writer.close()
            if self.jsonl is not None:
                self.jsonl.close()
