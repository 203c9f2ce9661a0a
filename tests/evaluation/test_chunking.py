"""Chunked choice batches (chunk_tokens): the same scores, losses and gradients as one pass, in float64.

Mutations tried, each caught (then reverted):
- the chunks' log-probabilities left in chunk order (no inverse permutation) -> 9 tests, the equivalences;
- ChoiceBatch.select trimming the inputs one column short -> 10 tests, the equivalences;
- the output layer's hook never installed (logits at every position, selected afterwards: the same values)
  -> test_the_output_layer_sees_only_real_choice_tokens;
- the cross-attention's repeat after the projection left out -> 16 tests (shape errors); each example's row
  taken as the first C rows (`first = arange(B)`: other examples' states) -> 10 tests, the equivalences; the
  hooks never installed -> test_cross_attention_projects_each_examples_encoder_states_once."""

import numpy as np
import pytest
import torch

from tensorpoly_ds.evaluation import LossWeights, collate_choices, evaluate, score_batch, tfew_losses
from tensorpoly_ds.evaluation.chunking import example_lengths, plan_chunks
from tensorpoly_ds.evaluation.rank_classification import IGNORE, choice_token_logprobs
from tests.conftest import tiny_t5
from tests.evaluation.test_rank_classification import VOCAB, make_rows, routed_model

BUDGETS = [1, 12, 30, 10_000]


def lengths_of(batch):
    return example_lengths(batch.attention_mask, (batch.choice_labels != IGNORE).sum(dim=1), batch.choice_owner)


def slots(inputs, longest, counts, chunk):
    return len(chunk) * int(inputs[chunk].max()) + int(counts[chunk].sum()) * int(longest[chunk].max())


@pytest.mark.parametrize("budget", BUDGETS)
def test_plan_covers_every_example_once_within_the_budget(budget):
    rng = np.random.default_rng(budget)
    inputs, longest, counts = rng.integers(1, 40, 23), rng.integers(1, 8, 23), rng.integers(1, 5, 23)
    chunks = plan_chunks(inputs, longest, counts, budget)
    assert sorted(i for c in chunks for i in c) == list(range(23))
    for c in chunks:
        assert len(c) == 1 or slots(inputs, longest, counts, c) <= budget, (c, budget)
    flat = [i for c in chunks for i in c]  # chunks are runs of the (input, longest choice, index) order
    assert flat == sorted(range(23), key=lambda i: (inputs[i], longest[i], i))
    if budget == 1:
        assert all(len(c) == 1 for c in chunks)
    if budget == 10_000:
        assert len(chunks) == 1


def test_plan_rejects_a_budget_below_one():
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1, got 0"):
        plan_chunks(np.ones(2, np.int64), np.ones(2, np.int64), np.ones(2, np.int64), 0)


def test_select_pads_only_to_the_chunk():
    rows = make_rows(7)
    batch = collate_choices(rows, [0, 1, 2, 0, 1, 2, 0])
    sub, choices = batch.select([3, 1])
    assert sub.input_ids.shape[1] == max(len(rows[3]["input_ids"]), len(rows[1]["input_ids"]))
    assert sub.choice_labels.shape[1] == max(len(c) for r in (rows[3], rows[1]) for c in r["choice_ids"])
    assert sub.task_ids.tolist() == [0, 1]
    assert sub.choice_owner.tolist() == [0] * len(rows[3]["choice_ids"]) + [1] * len(rows[1]["choice_ids"])
    for j, c in enumerate(choices.tolist()):
        width = sub.choice_labels.shape[1]
        assert torch.equal(sub.choice_labels[j], batch.choice_labels[c, :width])


def model_for(method):
    """A routed adapter model, or (fullft) the bare backbone with every weight trained."""
    if method == "fullft":
        return tiny_t5(VOCAB).double().train()
    return routed_model(method).double().train()


@pytest.mark.parametrize("method", ["poly", "tensorpoly_x", "ia3", "fullft"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_chunked_token_logprobs_and_gradients_equal_one_pass(method, budget):
    torch.manual_seed(0)
    model = model_for(method)
    rows = make_rows(9, seed=3)
    batch = collate_choices(rows, [i % 3 for i in range(9)])
    ref_lp, ref_valid = choice_token_logprobs(model, batch)
    lp, valid = choice_token_logprobs(model, batch, chunk_tokens=budget)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = torch.autograd.grad(tfew_losses(model, batch, LossWeights())["loss"], params)
    got = torch.autograd.grad(tfew_losses(model, batch, LossWeights(), chunk_tokens=budget)["loss"], params)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


def test_chunked_evaluation_gives_the_same_records():
    torch.manual_seed(0)
    model = routed_model().double()
    rows = make_rows(11, seed=5)
    ref = evaluate(model, rows, batch_size=4, length_norm=1.0, task_id=1)
    got = evaluate(model, rows, batch_size=4, length_norm=1.0, task_id=1, chunk_tokens=20)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in ref]
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=0, atol=1e-10)
    scores, _ = score_batch(model, collate_choices(rows[:4], 1), 1.0, chunk_tokens=1)
    assert scores.shape == (4, max(len(r["choice_ids"]) for r in rows[:4]))


def test_the_output_layer_sees_only_real_choice_tokens():
    """The chunked path applies the model's output layer to the real tokens' decoder states only (no logits
    at padded positions), and leaves no hook behind."""
    from tensorpoly_ds.evaluation.rank_classification import _choice_logits

    model = routed_model()
    batch = collate_choices(make_rows(6, seed=2), 0)
    real = batch.choice_labels != IGNORE
    head = model.get_output_embeddings()
    rows_seen = []
    spy = head.register_forward_hook(lambda _m, args, _out: rows_seen.append(tuple(args[0].shape)))
    logits = _choice_logits(model, batch, real)
    spy.remove()
    assert bool((~real).any())  # the fixture pads some choice
    assert rows_seen == [(int(real.sum()), model.config.d_model)]
    assert logits.shape == (int(real.sum()), model.config.vocab_size)
    torch.testing.assert_close(logits, _choice_logits(model, batch)[real], rtol=1e-5, atol=1e-5)
    assert not head._forward_pre_hooks


@pytest.mark.parametrize("method", ["poly", "fullft"])
def test_cross_attention_projects_each_examples_encoder_states_once(method):
    """In a chunked pass T5's cross-attention key and value projections see one row per example, not one per
    choice (the adapter's frozen base where an adapter wraps them), and no hook is left behind."""
    from tensorpoly_ds.adapters import AdapterLinear
    from tensorpoly_ds.evaluation.rank_classification import CROSS_ATTENTION_INPUTS

    model = model_for(method)
    rows = make_rows(6, seed=2)
    batch = collate_choices(rows, 0)
    assert batch.choice_labels.shape[0] > len(rows)  # the fixture has examples with several choices
    linears = []
    for name, module in model.named_modules():
        if name.endswith(CROSS_ATTENTION_INPUTS):
            linears.append(module.base if isinstance(module, AdapterLinear) else module)
    assert len(linears) == 2 * model.config.num_decoder_layers
    seen = []
    spies = [
        m.register_forward_hook(lambda _m, args, out: seen.append((args[0].shape[0], out.shape[0]))) for m in linears
    ]
    choice_token_logprobs(model, batch, chunk_tokens=10_000)  # one pass holding the whole batch
    for h in spies:
        h.remove()
    assert seen == [(len(rows), len(rows))] * len(linears)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in linears)
