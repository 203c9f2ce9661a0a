"""Routing recovery on constructed routing matrices: perfect up to permutation, random, a hand-computed case."""

import itertools

import numpy as np
import pytest

from tensorpoly_ds.analysis import plot_recovery, routing_recovery
from tensorpoly_ds.analysis.recovery import max_assignment
from tests.figures import assert_figure


def truth_matrix(tasks=12, skills=4, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        t = (rng.random((tasks, skills)) < 0.45).astype(float)
        if t.sum(1).min() > 0 and len({tuple(r) for r in t}) > tasks // 2:
            return t


def test_truth_up_to_module_permutation_and_scaling_recovers_perfectly(tmp_path):
    truth = truth_matrix()
    perm = [2, 0, 3, 1]
    learned = np.zeros((12, 6))
    learned[:, [4, 1, 5, 0]] = 3.0 * truth[:, perm]  # two extra, unused modules; scaled
    rec = routing_recovery(learned, truth, n_perm=200)
    assert rec.score == pytest.approx(1.0) and rec.matching == pytest.approx(1.0)
    assert rec.p_value < 0.01 and rec.null_mean < 0.5
    # skill s sits in column [4, 1, 5, 0][perm.index(s)]
    assert rec.assignment == tuple([4, 1, 5, 0][perm.index(s)] for s in range(4))
    path = plot_recovery(learned, truth, [f"t{i}" for i in range(12)], list("abcd"), tmp_path / "rec.png", rec)
    assert_figure(path)


def test_random_routing_scores_near_zero_with_a_large_p():
    truth = truth_matrix(tasks=16, seed=1)
    scores, ps = [], []
    for seed in range(5):
        learned = np.random.default_rng(100 + seed).random((16, 8))
        rec = routing_recovery(learned, truth, n_perm=300, seed=seed)
        scores.append(rec.score)
        ps.append(rec.p_value)
    assert abs(np.mean(scores)) < 0.15 and np.median(ps) > 0.2


def test_hand_computed_small_case():
    truth = np.array([[1, 0], [1, 1], [0, 1]], dtype=float)
    learned = np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1]])
    rec = routing_recovery(learned, truth, n_perm=50)
    # similarities (pairs 01, 02, 12): truth [.707, 0, .707] -> ranks [2.5, 1, 2.5];
    # learned [.707, 0, 0] -> ranks [3, 1.5, 1.5]; Pearson of the ranks = 0.75 / 1.5
    assert rec.score == pytest.approx(0.5)
    # corr(skill 0, feature 0) = sqrt(3)/2, corr(skill 1, feature 1 or 2) = 1/2; the other pairing gives 1/2 + 1/2
    assert rec.matching == pytest.approx((np.sqrt(3) / 2 + 0.5) / 2)
    assert rec.assignment[0] == 0 and rec.assignment[1] in (1, 2)


def test_fewer_features_than_skills_leaves_a_skill_unmatched():
    truth = truth_matrix(tasks=10, skills=3, seed=2)
    learned = truth[:, [2, 0]] + 0.1
    rec = routing_recovery(learned, truth, n_perm=10)
    assert sorted(rec.assignment) == [-1, 0, 1] and rec.assignment[1] == -1
    assert rec.matching == pytest.approx(2 / 3)


@pytest.mark.parametrize("shape", [(3, 3), (4, 6), (5, 5), (3, 7)])
def test_hungarian_assignment_equals_brute_force(shape):
    gain = np.random.default_rng(sum(shape)).normal(size=shape)
    cols = max_assignment(gain)
    best = max(sum(gain[i, c] for i, c in enumerate(p)) for p in itertools.permutations(range(shape[1]), shape[0]))
    assert len(set(cols.tolist())) == shape[0] and gain[np.arange(shape[0]), cols].sum() == pytest.approx(best)


def test_bad_inputs_are_named():
    truth = np.array([[1, 0], [0, 1], [1, 1]], dtype=float)
    with pytest.raises(ValueError, match="3 task rows but truth has 2"):
        routing_recovery(np.ones((3, 2)), truth[:2])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are all zero"):
        routing_recovery(np.array([[1.0, 0], [0, 0], [1, 1]]), truth)
    with pytest.raises(ValueError, match="binary"):
        routing_recovery(np.ones((3, 2)), truth * 0.5)
