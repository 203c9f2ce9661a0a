"""Does the routing learned in multi-task pretraining recover the true task-skill structure (claim C7)?

    rec = routing_recovery(learned, truth)   # learned [tasks, F] routing features, truth [tasks, skills] binary
    rec.score, rec.p_value, rec.matching

score: Spearman correlation between the upper triangles of two task x task similarity matrices, the cosine
similarity of the learned feature rows and that of the true skill rows. It compares which tasks are routed
alike with which tasks share skills, so it does not care how modules are numbered, how many there are
(F != skills) or how each task's weights are scaled, and ranks make it indifferent to monotone distortions
(sigmoid, normalisation). p_value: one-sided, from `n_perm` random relabellings of the truth's tasks.
matching: the skills are assigned to distinct learned features (columns) maximising the summed Pearson
correlation across tasks (exact Hungarian assignment); matching is the mean over skills of the assigned
correlation (a skill left without a feature when F < skills counts 0). See docs/replicate.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Recovery:
    score: float  # Spearman(learned task similarity, true task similarity), upper triangles
    null_mean: float  # mean score under random relabelling of the truth's tasks
    p_value: float  # P(null >= score), (1 + hits) / (1 + n_perm)
    matching: float  # mean over skills of corr(skill column, its assigned feature column)
    assignment: tuple[int, ...]  # feature index per skill (-1: none left when F < skills)
    skill_correlations: tuple[float, ...]
    n_tasks: int
    n_perm: int

    def summary(self) -> str:
        return (
            f"routing recovery: score {self.score:+.3f} (null mean {self.null_mean:+.3f}, p {self.p_value:.3g}, "
            f"{self.n_tasks} tasks), skill matching {self.matching:+.3f}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


# --- pieces ------------------------------------------------------------------------------------------------


def cosine_similarity(rows: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{what}: row(s) {np.flatnonzero(norms == 0).tolist()} are all zero (no cosine similarity)")
    unit = rows / norms[:, None]
    # equal similarities must tie in the ranks whatever the rounding of their computation
    return np.round(unit @ unit.T, 10)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Correlation; nan when either side is constant."""
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def max_assignment(gain: np.ndarray) -> np.ndarray:
    """Exact maximum-gain assignment of the rows of `gain` [n, m] (n <= m) to distinct columns: the
    Hungarian algorithm with potentials, O(n^2 m). Returns the column of every row."""
    n, m = gain.shape
    if n > m:
        raise ValueError(f"max_assignment needs rows <= columns, got {gain.shape}")
    cost = gain.max() - gain if gain.size else gain  # minimise cost = maximise gain
    inf = float("inf")
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j] = row (1-based) holding column j; 0 free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv = np.full(m + 1, inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    col = np.full(n, -1, dtype=np.int64)
    for j in range(1, m + 1):
        if owner[j]:
            col[owner[j] - 1] = j - 1
    return col


def skill_feature_correlations(learned: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[skills, F] Pearson correlation across tasks of each skill column with each feature column (nan -> 0)."""
    out = np.zeros((truth.shape[1], learned.shape[1]))
    for s in range(truth.shape[1]):
        for f in range(learned.shape[1]):
            out[s, f] = pearson(truth[:, s], learned[:, f])
    return np.nan_to_num(out, nan=0.0)


def _check(learned: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    learned, truth = np.asarray(learned, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if learned.ndim != 2 or truth.ndim != 2:
        raise ValueError(f"learned and truth must be 2-D [tasks, ...], got shapes {learned.shape} and {truth.shape}")
    if learned.shape[0] != truth.shape[0]:
        raise ValueError(f"learned has {learned.shape[0]} task rows but truth has {truth.shape[0]}")
    if learned.shape[0] < 3:
        raise ValueError(f"routing recovery needs at least 3 tasks (task pairs to rank), got {learned.shape[0]}")
    if not np.isfinite(learned).all():
        raise ValueError("learned routing features contain non-finite values")
    if not np.isin(truth, (0.0, 1.0)).all():
        raise ValueError("truth must be a binary task x skill matrix (0/1)")
    return learned, truth


# --- the metric --------------------------------------------------------------------------------------------


def routing_recovery(learned: np.ndarray, truth: np.ndarray, *, n_perm: int = 1000, seed: int = 0) -> Recovery:
    learned, truth = _check(learned, truth)
    n = learned.shape[0]
    upper = np.triu_indices(n, k=1)
    sim_learned = cosine_similarity(learned, "learned routing features")[upper]
    sim_truth_full = cosine_similarity(truth, "truth (a task without skills)")
    if np.ptp(sim_truth_full[upper]) == 0:
        raise ValueError("truth: every pair of tasks is equally similar, so there is no structure to recover")
    score = spearman(sim_learned, sim_truth_full[upper])
    if not np.isfinite(score):
        score = 0.0  # constant learned similarities (e.g. uniform routing) carry no structure
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        perm = rng.permutation(n)
        null[i] = spearman(sim_learned, sim_truth_full[np.ix_(perm, perm)][upper])
    null = np.nan_to_num(null, nan=0.0)
    p_value = (1 + int((null >= score - 1e-12).sum())) / (1 + n_perm)
    corr = skill_feature_correlations(learned, truth)
    skills, features = corr.shape
    if skills <= features:
        assignment = max_assignment(corr)
    else:  # assign the features to skills instead; the skills left over get no feature
        by_feature = max_assignment(corr.T)
        assignment = np.full(skills, -1, dtype=np.int64)
        assignment[by_feature] = np.arange(features)
    per_skill = np.array([corr[s, f] if f >= 0 else 0.0 for s, f in enumerate(assignment)])
    return Recovery(
        score=float(score),
        null_mean=float(null.mean()) if n_perm else float("nan"),
        p_value=float(p_value),
        matching=float(per_skill.mean()),
        assignment=tuple(int(f) for f in assignment),
        skill_correlations=tuple(map(float, per_skill)),
        n_tasks=n,
        n_perm=n_perm,
    )


def plot_recovery(
    learned: np.ndarray,
    truth: np.ndarray,
    task_names: Sequence[str],
    skill_names: Sequence[str],
    path: str | os.PathLike,
    recovery: Recovery | None = None,
    title: str = "",
) -> Path:
    """Truth (tasks x skills) next to the learned routing (tasks x features), the features reordered so that
    each skill's matched feature sits under it and the unmatched features follow. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned, truth = _check(learned, truth)
    rec = recovery or routing_recovery(learned, truth, n_perm=0)
    matched = [f for f in rec.assignment if f >= 0]
    order = matched + [f for f in range(learned.shape[1]) if f not in set(matched)]
    path = Path(path)
    height = max(3.0, min(0.3 * len(task_names) + 1.5, 20))
    fig, axes = plt.subplots(
        1,
        2,
        figsize=(4 + 0.35 * (truth.shape[1] + min(learned.shape[1], 40)), height),
        gridspec_kw={"width_ratios": [max(truth.shape[1], 1), max(min(learned.shape[1], 40), 1)]},
    )
    axes[0].imshow(truth, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("ground truth", fontsize="small")
    axes[0].set_xticks(range(truth.shape[1]))
    axes[0].set_xticklabels(list(skill_names), rotation=60, ha="right", fontsize=6)
    axes[0].set_yticks(range(len(task_names)))
    axes[0].set_yticklabels(list(task_names), fontsize=6)
    im = axes[1].imshow(learned[:, order], aspect="auto", cmap="viridis", interpolation="nearest")
    axes[1].set_title(f"learned routing (score {rec.score:+.2f}, matching {rec.matching:+.2f})", fontsize="small")
    axes[1].set_xticks(range(len(order)))
    axes[1].set_xticklabels([str(f) for f in order], fontsize=5)
    axes[1].set_xlabel("feature (matched to the skills first)", fontsize="small")
    axes[1].set_yticks([])
    fig.colorbar(im, ax=axes[1], fraction=0.05)
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    from ..figures import save_figure

    return save_figure(fig, path)
