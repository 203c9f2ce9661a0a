"""Batched rank classification against a brute-force reference (one full forward pass per choice)."""

import random

import pytest
import torch

from tensorpoly_ds.adapters import AdapterConfig, inject_adapters, task_routing
from tensorpoly_ds.evaluation import (
    LossWeights,
    accuracy,
    collate_choices,
    evaluate,
    rank_plan,
    score_batch,
    tfew_losses,
)
from tests.conftest import tiny_t5

VOCAB = 64


def make_rows(n=7, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 4)  # unequal numbers of choices, one example with a single choice possible
        choices = []
        while len(choices) < k:  # distinct choices: identical ones tie and make argmin arbitrary
            c = [rng.randint(2, VOCAB - 1) for _ in range(rng.randint(0, 5))] + [1]
            if c not in choices:
                choices.append(c)
        rows.append(
            {
                "task_name": "t",
                "template": f"tpl{i % 2}",
                "example_id": 100 + i,
                "input_ids": [rng.randint(2, VOCAB - 1) for _ in range(rng.randint(1, 9))],
                "choice_ids": choices,
                "label": rng.randrange(k),
            }
        )
    rows[0]["choice_ids"] = [[5, 1], [5, 6, 7, 8, 9, 10, 1], [1]]  # very different lengths
    rows[0]["label"] = 1
    return rows


def routed_model(method="poly"):
    model = tiny_t5(VOCAB)
    inject_adapters(model, AdapterConfig(method=method, skills=3, init_scale=0.3), num_tasks=3)
    with torch.no_grad():  # make the adapters matter (LoRA B is zero at init)
        for name, p in model.named_parameters():
            if "lora_b" in name or "logits" in name:
                p.normal_(0, 0.5)
    return model.eval()


def brute_force(model, row, task_id, length_norm):
    scores = []
    for c in row["choice_ids"]:
        with task_routing(torch.tensor([task_id])), torch.no_grad():
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([c]))
        nll = out.loss.item() * len(c)  # loss is the token mean
        scores.append(nll / len(c) ** length_norm if length_norm else nll)
    return scores


@pytest.mark.parametrize("length_norm", [0.0, 1.0, 0.5])
def test_batched_scores_match_one_forward_per_choice(length_norm):
    torch.manual_seed(1)
    model = routed_model()
    rows = make_rows()
    task_ids = [i % 3 for i in range(len(rows))]  # mixed tasks in one batch: decoder ids repeated per choice
    batch = collate_choices(rows, task_ids)
    scores, preds = score_batch(model, batch, length_norm)
    assert scores.shape == (len(rows), max(len(r["choice_ids"]) for r in rows))
    for i, row in enumerate(rows):
        ref = brute_force(model, row, task_ids[i], length_norm)
        c = len(row["choice_ids"])
        torch.testing.assert_close(scores[i, :c], torch.tensor(ref), rtol=1e-4, atol=1e-4)
        assert torch.isinf(scores[i, c:]).all()
        assert int(preds[i]) == min(range(c), key=lambda j: ref[j])


def test_length_normalisation_changes_the_prediction():
    torch.manual_seed(0)
    model = routed_model()
    row = make_rows()[0]
    raw = brute_force(model, row, 0, 0.0)
    normed = brute_force(model, row, 0, 1.0)
    # sanity of the fixture: the long choice loses without normalisation
    assert raw[1] > raw[0]
    s0, _ = score_batch(model, collate_choices([row], 0), 0.0)
    s1, _ = score_batch(model, collate_choices([row], 0), 1.0)
    lengths = torch.tensor([len(c) for c in row["choice_ids"]], dtype=torch.float)
    torch.testing.assert_close(s1[0], s0[0] / lengths)
    assert normed[1] < raw[1]


def test_evaluate_order_batching_and_accuracy():
    model = routed_model("mhr")
    rows = make_rows(11, seed=3)
    full = evaluate(model, rows, batch_size=3, task_id=1)
    one = evaluate(model, rows, batch_size=1, task_id=1)
    assert [r["example_id"] for r in full] == [r["example_id"] for r in rows]
    for a, b in zip(full, one):
        assert a["prediction"] == b["prediction"]
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-4, abs=1e-4)
        assert len(a["scores"]) == len(rows[a["index"]]["choice_ids"])
    acc = accuracy(full)
    correct = [r["prediction"] == r["label"] for r in full]
    assert acc["accuracy"] == pytest.approx(sum(correct) / len(correct))
    t0 = [c for c, r in zip(correct, rows) if r["template"] == "tpl0"]
    assert acc["per_template"]["t"]["tpl0"] == pytest.approx(sum(t0) / len(t0))


@pytest.mark.parametrize("n,world,bs", [(0, 2, 4), (1, 2, 4), (7, 2, 3), (10, 3, 2), (5, 1, 2), (4, 4, 1)])
def test_rank_plan_equal_batches_and_full_cover(n, world, bs):
    plans = [rank_plan(n, bs, r, world) for r in range(world)]
    shapes = {tuple(len(b) for b in p) for p in plans}
    assert len(shapes) == 1, "every rank must run the same number and sizes of batches"
    real = sorted(i for p in plans for b in p for i, ok in b if ok)
    assert real == list(range(n))


def test_tfew_losses_against_direct_computation():
    torch.manual_seed(2)
    model = routed_model()
    rows = [r for r in make_rows(8, seed=5) if len(r["choice_ids"]) > 1][:4]
    batch = collate_choices(rows, 0)
    out = tfew_losses(model, batch, LossWeights(lm=1.0, mc=0.5, unlikelihood=0.25))
    lm_num = lm_den = 0.0
    mc_terms, ul_num, ul_den = [], 0.0, 0
    for row in rows:
        lps = []
        for j, c in enumerate(row["choice_ids"]):
            with task_routing(torch.tensor([0])), torch.no_grad():
                logits = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([c])).logits[0]
            tok = torch.log_softmax(logits, -1)[torch.arange(len(c)), torch.tensor(c)]
            lps.append(tok.sum().item() / len(c))
            if j == row["label"]:
                lm_num -= tok.sum().item()
                lm_den += len(c)
            else:
                ul_num -= torch.log(1 - tok.exp() + 1e-2).sum().item()
                ul_den += len(c)
        mc_terms.append(-torch.log_softmax(torch.tensor(lps), 0)[row["label"]].item())
    lm, mc, ul = lm_num / lm_den, sum(mc_terms) / len(mc_terms), ul_num / ul_den
    assert out["lm"].item() == pytest.approx(lm, rel=1e-4)
    assert out["mc"].item() == pytest.approx(mc, rel=1e-4)
    assert out["unlikelihood"].item() == pytest.approx(ul, rel=1e-4)
    assert out["loss"].item() == pytest.approx(lm + 0.5 * mc + 0.25 * ul, rel=1e-4)
    only_lm = tfew_losses(model, batch, LossWeights(lm=1.0, mc=0.0, unlikelihood=0.0))
    assert only_lm["loss"].item() == pytest.approx(lm, rel=1e-4)
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_loss_weights_validated():
    with pytest.raises(ValueError, match="unlikelihood"):
        LossWeights(unlikelihood=-1)
