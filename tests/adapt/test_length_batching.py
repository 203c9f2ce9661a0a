"""Length-aware batching of adaptation jobs (job fields `batching`, `group_size`, `eval_batching`,
`chunk_tokens`): the local trainer's length-grouped sampler, length-sorted rank classification, chunked jobs,
and the job fields' validation.

Mutations tried, each caught by the test named (then reverted):
- sampler: the block shuffle seeded without the epoch (default_rng([seed, w])): every epoch takes its windows'
  batches in the same order -> test_grouped_order_is_a_function_of_the_seed;
- sampler: `head = 0` (windows start at the epoch, off the queue's batch grid) and, separately, the partial last
  batch of an epoch put first instead of last -> test_batches_hold_neighbouring_lengths[50];
- sampler: `epoch` left out of state_dict -> test_resume_mid_epoch_is_exact; load_state_dict not restoring it
  (`self.epoch = 0`) -> test_grouped_job_resumes_mid_epoch_to_the_uninterrupted_result;
- sampler, random path: the permutation appended reversed, and the grouped state keys written for random too
  -> test_random_order_is_the_old_one;
- evaluate: `order` not applied to the batches (plan positions used as row indices) ->
  test_length_sorted_evaluation_gives_the_in_order_records (the batches it scored are not the order's slices);
- job: Evaluations not passing the order (self.order = None) -> test_length_sorted_job_writes_the_in_order_predictions;
- spec: the batching check removed from __post_init__ -> test_bad_values_are_refused_naming_field_and_value;
- spec: to_dict through dataclasses.asdict (the new fields always written) ->
  test_new_fields_stay_out_of_records_at_their_defaults;
- engine: `batching=job.batching` left out of the few-shot train() call, and separately row_lengths ignoring
  a table's length_keys() -> test_engine_job_trains_with_the_jobs_batching.
- engine: `chunk_tokens` left out of the few-shot loss hook -> test_chunked_job_trains_and_evaluates_as_one_pass[engine].
(A first version of the head mutation, dropping the head rows, loops forever for n < batch: the queue never
fills; `head = 0` is the mutation recorded.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tensorpoly_ds.adapt.local_train import EpochSampler, LocalCheckpointError
from tensorpoly_ds.adapt.spec import AdaptJob, JobError
from tensorpoly_ds.evaluation import evaluate, length_keys, length_order
from tensorpoly_ds.evaluation import rank_classification as rc

BASE = {"out_dir": "o", "data_dir": "d", "task": "t", "method": "lora"}


def spread_lengths(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) keys with many distinct values: inputs 5..300, longest choice 1..20."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(5, 300, n), rng.integers(1, 20, n)], axis=1)


def draw(sampler: EpochSampler, steps: int) -> list[list[int]]:
    return [sampler.next() for _ in range(steps)]


def grouped(n, batch, seed=0, group=4, lengths=None):
    return EpochSampler(n, batch, seed, lengths=spread_lengths(n) if lengths is None else lengths, group_size=group)


def test_grouped_order_is_a_function_of_the_seed():
    a, b, c = grouped(50, 8, seed=3), grouped(50, 8, seed=3), grouped(50, 8, seed=4)
    run = draw(a, 40)
    assert run == draw(b, 40)
    assert run != draw(c, 40)
    # epochs differ from each other too (n = 32 = one window: only the block shuffle and the draw vary)
    s = grouped(32, 8, seed=0)
    epochs = [sum(draw(s, 4), []) for _ in range(6)]
    assert len({tuple(e) for e in epochs}) > 1
    orders = {tuple(tuple(sorted(b)) for b in (e[i : i + 8] for i in range(0, 32, 8))) for e in epochs}
    assert len({frozenset(o) for o in orders}) == 1  # one window: the same 4 sorted batches every epoch
    assert len(orders) > 1  # taken in different orders


@pytest.mark.parametrize("n,batch,group", [(32, 8, 4), (50, 8, 4), (70, 8, 2), (3, 8, 4), (20, 8, 16), (9, 4, 1)])
def test_each_epoch_is_a_permutation_of_the_rows(n, batch, group):
    """Stream positions [e*n, (e+1)*n) hold every row once, for n a multiple of the batch or not, and for
    fewer rows than one batch (which then repeat across epochs as in the random order)."""
    s = grouped(n, batch, group=group)
    stream = sum(draw(s, -(-6 * n // batch)), [])
    for e in range(6):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n)), e


def test_windows_hold_the_random_orders_rows():
    """Epoch 0's windows of group x batch rows are the random order's windows (the same permutation, sorted
    within windows): which rows share a window does not change, only which share a batch."""
    n, batch, group = 64, 8, 4
    rand = sum(draw(EpochSampler(n, batch, 7), n // batch), [])
    grp = sum(draw(grouped(n, batch, seed=7, group=group), n // batch), [])
    w = batch * group
    for start in range(0, n, w):
        assert sorted(rand[start : start + w]) == sorted(grp[start : start + w])
    assert rand != grp


@pytest.mark.parametrize("n", [64, 50])
def test_batches_hold_neighbouring_lengths(n):
    """Within a window the batches are slices of one sorted run: their input-length ranges do not overlap;
    padding over several epochs is well below the random order's on a wide spread of lengths (uniform input
    lengths, windows of 4 batches: each batch spans about a quarter of its window's range)."""
    batch, group = 8, 4
    lengths = spread_lengths(n)
    s = grouped(n, batch, group=group, lengths=lengths)
    batches = draw(s, n // batch)  # epoch 0: windows start at 0 (no batch straddles into it)
    for start in range(0, n // batch, group):  # the full batches of each window (n = 50: 4, then 2)
        ranges = sorted((lengths[b, 0].min(), lengths[b, 0].max()) for b in batches[start : start + group])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:])), ranges

    def padding(sampler):
        steps = draw(sampler, 5 * n // batch)
        useful = sum(int(lengths[b, 0].sum()) for b in steps)
        return 1 - useful / sum(len(b) * int(lengths[b, 0].max()) for b in steps)

    assert padding(grouped(n, batch, group=group, lengths=lengths)) < 0.7 * padding(EpochSampler(n, batch, 0))


def test_random_order_is_the_old_one():
    """Without lengths the sampler is the one every published result used: a queue of seeded permutations."""
    gen, queue, expected = torch.Generator().manual_seed(11), [], []
    for _ in range(20):
        while len(queue) < 8:
            queue += torch.randperm(13, generator=gen).tolist()
        expected.append(queue[:8])
        queue = queue[8:]
    s = EpochSampler(13, 8, 11)
    assert draw(s, 20) == expected
    assert set(s.state_dict()) == {"generator", "queue"}  # a random checkpoint reads as before


@pytest.mark.parametrize("stop_at", [1, 3, 6, 9])
def test_resume_mid_epoch_is_exact(stop_at, tmp_path):
    """A sampler restored from a saved state (torch.save / weights_only load, as the local checkpoint does)
    continues with exactly the batches of the uninterrupted one, mid-epoch and across epoch boundaries."""
    n, batch = 50, 8
    reference = draw(grouped(n, batch, seed=5), 20)
    first = grouped(n, batch, seed=5)
    assert draw(first, stop_at) == reference[:stop_at]
    torch.save(first.state_dict(), tmp_path / "s.pt")
    second = grouped(n, batch, seed=5)
    second.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert draw(second, 20 - stop_at) == reference[stop_at:]


def test_resume_with_another_batching_is_refused():
    state = grouped(50, 8).state_dict()
    with pytest.raises(
        LocalCheckpointError, match="batching=length_grouped, group_size=4; this job has batching=random"
    ):
        EpochSampler(50, 8, 0).load_state_dict(state)
    with pytest.raises(LocalCheckpointError, match="group_size=4; this job has batching=length_grouped, group_size=2"):
        grouped(50, 8, group=2).load_state_dict(state)
    with pytest.raises(LocalCheckpointError, match="batching=random; this job has batching=length_grouped"):
        grouped(50, 8).load_state_dict(EpochSampler(50, 8, 0).state_dict())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("batching", "sorted", r"job field 'batching' = 'sorted': valid: random, length_grouped"),
        ("group_size", 0, r"job field 'group_size' = 0: must be >= 1"),
        ("eval_batching", "random", r"job field 'eval_batching' = 'random': valid: in_order, length_sorted"),
        ("group_size", "4", r"key 'group_size' = '4': expected an integer, got str"),
        ("chunk_tokens", -1, r"job field 'chunk_tokens' = -1: must be >= 0"),
    ],
)
def test_bad_values_are_refused_naming_field_and_value(field, value, message):
    with pytest.raises(JobError, match=message):
        AdaptJob.from_dict({**BASE, field: value}, source="jobs.yaml")


def test_chunks_are_refused_under_zero3():
    with pytest.raises(JobError, match=r"'chunk_tokens' = 512 needs zero_stage < 3"):
        AdaptJob.from_dict({**BASE, "chunk_tokens": 512, "zero_stage": 3})
    assert AdaptJob.from_dict({**BASE, "chunk_tokens": 512, "zero_stage": 2}).chunk_tokens == 512


def test_new_fields_stay_out_of_records_at_their_defaults():
    """job.json, result.json and job tables of jobs at the defaults keep the bytes published results have."""
    plain = AdaptJob.from_dict(BASE).to_dict()
    assert not {"batching", "group_size", "eval_batching", "chunk_tokens"} & set(plain)
    on = AdaptJob.from_dict({**BASE, "batching": "length_grouped", "eval_batching": "length_sorted"}).to_dict()
    assert on["batching"] == "length_grouped" and on["eval_batching"] == "length_sorted"
    assert "group_size" not in on  # at its default
    assert AdaptJob.from_dict(on).to_dict() == on


# --- rank classification in order of length ------------------------------------------------------------------
def eval_rows(n=40, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        choices: list[list[int]] = []
        while len(choices) < 2 + i % 3:  # distinct choices: identical ones tie
            c = [int(t) for t in rng.integers(2, vocab, int(rng.integers(1, 6)))] + [1]
            if c not in choices:
                choices.append(c)
        rows.append(
            {
                "task_name": "t",
                "template": f"tpl{i % 3}",
                "example_id": 500 + i,
                "input_ids": [int(t) for t in rng.integers(2, vocab, int(rng.integers(1, 40)))],
                "choice_ids": choices,
                "label": int(rng.integers(0, len(choices))),
            }
        )
    return rows


def test_length_order_sorts_by_input_then_longest_choice():
    rows = [
        {"input_ids": [2] * 5, "choice_ids": [[3, 1], [3, 3, 3, 1]]},
        {"input_ids": [2] * 3, "choice_ids": [[1]]},
        {"input_ids": [2] * 5, "choice_ids": [[3, 1]]},
        {"input_ids": [2] * 3, "target_ids": [4, 4, 1]},
    ]
    assert length_keys(rows).tolist() == [[5, 4], [3, 1], [5, 2], [3, 3]]
    assert length_order(rows) == [1, 3, 2, 0]


def test_length_sorted_evaluation_gives_the_in_order_records(monkeypatch):
    """The same records in the same (row) order, the same predictions, and scores within float noise: the two
    orders pad the rows to other widths and put them in other batches, so the float32 matmuls run on other
    shapes (tolerance 1e-4 as for other batch sizes in tests/evaluation: scores are sums of ~6 token NLLs of
    order 1-10 through a 2+2-layer T5; measured here: at most 4e-7 relative, 1.1e-5 absolute, 84 of 119
    scores bitwise equal; it passes under ATEN_CPU_CAPABILITY=default, OMP_NUM_THREADS=1 and
    TPDS_TEST_NO_MKLDNN=1). Predictions are compared exactly because every row's best and second-best scores
    differ by far more than the tolerance (checked)."""
    from tests.evaluation.test_rank_classification import routed_model

    torch.manual_seed(2)
    model = routed_model("poly")
    rows = eval_rows()
    order = length_order(rows)
    assert order != list(range(len(rows)))
    plain = evaluate(model, rows, batch_size=8, length_norm=1.0, task_id=1)
    seen: list[list[int]] = []  # the example ids of each batch the sorted evaluation scores
    original = rc.collate_choices
    monkeypatch.setattr(
        rc, "collate_choices", lambda ex, *a: seen.append([r["example_id"] for r in ex]) or original(ex, *a)
    )
    sorted_ = evaluate(model, rows, batch_size=8, length_norm=1.0, task_id=1, order=order)
    assert seen == [[500 + i for i in order[s : s + 8]] for s in range(0, len(rows), 8)]
    margins = [sorted(r["scores"])[1] - sorted(r["scores"])[0] for r in plain]
    assert min(margins) > 1e-2, "fixture: a near tie would make the prediction depend on float noise"
    assert [r["index"] for r in sorted_] == list(range(len(rows)))
    for a, b in zip(plain, sorted_):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-4, abs=1e-4)
    # the padding the order saves: input slots of the batches
    widths = {
        name: sum(len(o) * max(len(rows[i]["input_ids"]) for i in o) for o in (seq[s : s + 8] for s in range(0, 40, 8)))
        for name, seq in (("in_order", list(range(40))), ("length_sorted", order))
    }
    assert widths["length_sorted"] < widths["in_order"]


def test_evaluate_refuses_an_order_that_is_not_a_permutation():
    from tests.evaluation.test_rank_classification import routed_model

    with pytest.raises(ValueError, match="not a permutation of the 3 row indices"):
        evaluate(routed_model(), eval_rows(3), order=[0, 0, 1])


# --- whole jobs (local trainer) on the embedded prepared data --------------------------------------------------
GROUPED = dict(batching="length_grouped", group_size=2, batch_size=2, eval_batching="length_sorted", trainer="local")


@pytest.mark.parametrize("chunk_tokens", [0, 48])
def test_grouped_job_resumes_mid_epoch_to_the_uninterrupted_result(
    prepared, poly_export, tmp_path, monkeypatch, chunk_tokens
):
    """Stopped at step 3 (k = 4 shots, batch 2: mid-epoch of the second epoch), the rerun ends with the
    uninterrupted job's evaluations and losses, bitwise (the same computation twice, docs/development.md); with
    chunked forward passes too (48 slots: one example per pass on this data)."""
    from tensorpoly_ds.adapt.job import job_sampler, run_job
    from tests.adapt.test_stop_resume import COMPARED, make_job, signal_at_call

    fields = {**GROUPED, "chunk_tokens": chunk_tokens}
    reference = run_job(make_job(prepared, poly_export, tmp_path / "uninterrupted", **fields))
    assert reference["status"] == "complete" and reference["job"]["batching"] == "length_grouped"
    job = make_job(prepared, poly_export, tmp_path / "stopped", **fields)
    assert job_sampler(job, [{"input_ids": [1]}] * 4, 2, 0).batching == "length_grouped"
    with monkeypatch.context() as m:
        signal_at_call(m, 3)
        assert run_job(job)["stopped"] == {"phase": "fewshot", "step": 3}
    resumed = run_job(job)
    assert resumed["status"] == "complete"
    for key in COMPARED:
        assert resumed[key] == reference[key], key


def test_length_sorted_job_writes_the_in_order_predictions(prepared, poly_export, tmp_path, monkeypatch):
    """predictions.jsonl keeps its rows, their order and format; predictions equal, scores within float noise
    (float32, other padding: the tolerance of test_length_sorted_evaluation_gives_the_in_order_records)."""
    from tensorpoly_ds.adapt import job as job_mod
    from tests.adapt.test_stop_resume import make_job

    orders = []
    original = job_mod.evaluate
    monkeypatch.setattr(job_mod, "evaluate", lambda *a, **k: orders.append(k.get("order")) or original(*a, **k))
    out = {}
    for name in ("in_order", "length_sorted"):
        job = make_job(
            prepared, poly_export, tmp_path / name, steps=2, eval_every=2, trainer="local", eval_batching=name
        )
        assert job_mod.run_job(job)["status"] == "complete"
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        out[name] = [json.loads(line) for line in lines]
    rows = job_mod.load_rows(str(prepared), f"eval/{job.task}")[: job.max_eval_examples]
    assert orders == [None, length_order(rows)] and orders[1] != list(range(len(rows)))
    plain, sorted_ = out["in_order"], out["length_sorted"]
    margins = [sorted(r["scores"])[1] - sorted(r["scores"])[0] for r in plain]
    assert min(margins) > 1e-3, "fixture: a near tie would make the prediction depend on float noise"
    assert [list(r) for r in sorted_] == [list(r) for r in plain]  # the same keys, in the same order
    for a, b in zip(plain, sorted_):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-4, abs=1e-4)


def test_engine_job_trains_with_the_jobs_batching(prepared, poly_export, tmp_path, monkeypatch):
    """The engine trainer gets the job's batching and group_size (its TrainStream), and sorts on the local
    trainer's keys (the rows' own length_keys: input length, longest choice)."""
    from tensorpoly_ds.adapt.job import run_job
    from tensorpoly_ds.engine import data as data_mod
    from tensorpoly_ds.engine import trainer as trainer_mod
    from tests.adapt.test_stop_resume import make_job

    streams = []

    class Spy(data_mod.TrainStream):
        def __init__(self, ds, **kw):
            super().__init__(ds, **kw)
            streams.append(self)

    monkeypatch.setattr(trainer_mod, "TrainStream", Spy)
    job = make_job(prepared, poly_export, tmp_path / "engine", **{**GROUPED, "trainer": "engine", "steps": 4})
    assert run_job(job)["status"] == "complete"
    (stream,) = streams
    assert (stream.batching, stream.group_size) == ("length_grouped", 2)
    rows = [stream.ds[i] for i in range(len(stream.ds))]
    assert stream.lengths().tolist() == length_keys(rows).tolist()
    # rows whose answer is not their longest choice: the engine reads the choices, not target_ids
    from tensorpoly_ds.adapt.engine_train import _Rows

    odd = [{"input_ids": [2] * 7, "choice_ids": [[3, 1], [3, 3, 3, 3, 1]], "target_ids": [3, 1], "task_id": 0}]
    assert data_mod.row_lengths(_Rows(odd)).tolist() == [[7, 5]]


LOSSES = ("loss", "lm", "mc", "unlikelihood")


@pytest.mark.parametrize("trainer", ["local", "engine"])
def test_chunked_job_trains_and_evaluates_as_one_pass(prepared, poly_export, tmp_path, monkeypatch, trainer):
    """chunk_tokens reaches training and evaluation on both trainers, and changes only rounding: the same
    predictions, losses and accuracies within float32 noise."""
    from tensorpoly_ds.adapt.job import run_job
    from tests.adapt.test_stop_resume import make_job

    chunks = []
    original = rc.plan_chunks
    # (budget, training?) per batch planned: scoring runs without gradients, training steps with them
    monkeypatch.setattr(rc, "plan_chunks", lambda *a: chunks.append((a[-1], torch.is_grad_enabled())) or original(*a))
    common = dict(steps=4, eval_every=2, batch_size=4, trainer=trainer)
    plain = run_job(make_job(prepared, poly_export, tmp_path / "plain", **common))
    assert chunks == []
    chunked = run_job(make_job(prepared, poly_export, tmp_path / "chunked", chunk_tokens=64, **common))
    assert chunks.count((64, True)) == 4 and chunks.count((64, False)) >= 2 and len(chunks) > 6
    assert chunked["job"]["chunk_tokens"] == 64
    assert len(chunked["train_loss"]) == len(plain["train_loss"]) > 0
    for a, b in zip(chunked["train_loss"], plain["train_loss"], strict=True):
        assert a["step"] == b["step"]
        assert {k: a[k] for k in LOSSES} == pytest.approx({k: b[k] for k in LOSSES}, rel=1e-4, abs=1e-5)
    for a, b in zip(chunked["evaluations"], plain["evaluations"], strict=True):
        assert a["accuracy"] == b["accuracy"] and a["step"] == b["step"]
    lines = {n: (tmp_path / n / "predictions.jsonl").read_text().splitlines() for n in ("plain", "chunked")}
    margins = [sorted(s)[1] - sorted(s)[0] for s in (json.loads(x)["scores"] for x in lines["plain"])]
    assert min(margins) > 1e-3, "fixture: a near tie would make the prediction depend on float noise"
    for a, b in zip(lines["plain"], lines["chunked"], strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["prediction"] == b["prediction"]
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-4, abs=1e-4)
