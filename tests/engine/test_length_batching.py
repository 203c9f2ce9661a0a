"""Length-grouped batching (engine/data.py, `data.batching: length_grouped`): the guarantees of the random
order (seeded, world-size independent, resumable mid-epoch, each row once per epoch) hold, the same rows are
trained per epoch, and padding drops. Each test names the mutation of data.py it was seen to catch."""

import json
from collections import Counter

import numpy as np
import pytest

from tensorpoly_ds.engine.config import RunConfigError, load_run_config
from tensorpoly_ds.engine.data import DataError, TrainStream, row_lengths

from .test_config import REPO

N_TASKS = 12


@pytest.fixture(scope="module")
def rows():
    """1000 rows in 12 tasks whose lengths differ by task (as P3's templates do): log-normal inputs, median
    40-160 by task, capped at 256; short targets."""
    import datasets

    rng = np.random.default_rng(7)
    task = rng.integers(0, N_TASKS, 1000)
    median = 40 * 4 ** (task / (N_TASKS - 1))
    inp = np.minimum(rng.lognormal(np.log(median), 0.5).astype(int) + 1, 256)
    tgt = np.minimum(rng.lognormal(np.log(3), 0.8, 1000).astype(int) + 1, 64)
    return datasets.Dataset.from_dict(
        {
            "task_id": task.tolist(),
            "input_ids": [[7] * int(n) for n in inp],
            "target_ids": [[8] * int(n) + [1] for n in tgt],
        }
    )


def stream(ds, batching="length_grouped", seed=3, micro=4, accum=2, rank=0, world=1, group_size=4):
    return TrainStream(
        ds,
        seed=seed,
        micro_batch=micro,
        grad_accum=accum,
        rank=rank,
        world_size=world,
        batching=batching,
        group_size=group_size,
    )


def steps(s, count):
    return [s.step_indices() for _ in range(count)]


def flat(step):
    return [i for mb in step for i in mb]


def test_the_same_rows_per_global_step_on_1_2_and_4_ranks(rows):
    """Mutation seen caught: sorting and cutting the group by micro-batch (micro x accum) instead of by the
    global batch, which makes a step's rows depend on the world size."""
    one = stream(rows, micro=4)
    two = [stream(rows, micro=2, rank=r, world=2) for r in range(2)]
    four = [stream(rows, micro=1, rank=r, world=4) for r in range(4)]
    random_order = stream(rows, batching="random")
    differs = 0
    for _ in range(300):  # 125 steps per epoch: two epochs and a bit, across many groups
        a = flat(one.step_indices())
        for layout in (two, four):
            parts = [flat(s.step_indices()) for s in layout]
            assert sorted(i for p in parts for i in p) == sorted(a)
            assert len(set().union(*map(set, parts))) == len(a)  # disjoint shares
        differs += sorted(a) != sorted(flat(random_order.step_indices()))
    assert differs > 250  # grouping is on: the steps are not the random order's
    assert one.state_dict() == two[1].state_dict() == four[3].state_dict()


def test_micro_batches_are_length_neighbours_on_any_layout(rows):
    """Every micro-batch of a 2-rank layout is a contiguous run of its global batch sorted by length, so it
    pads as little as the 1-rank layout's. Mutation seen caught: not sorting the group (lexsort removed)."""
    lengths = row_lengths(rows)[:, 0]
    two = [stream(rows, micro=2, rank=r, world=2) for r in range(2)]
    for _ in range(125):
        per_rank = [s.step_indices() for s in two]
        # layout order: micro-batch m of rank r is slice m * world + r of the sorted global batch
        ordered = [i for m in range(2) for r in range(2) for i in per_rank[r][m]]
        assert list(lengths[ordered]) == sorted(lengths[ordered])


def test_order_is_a_function_of_the_seed(rows):
    """Mutation seen caught: the group's batch order drawn from an unseeded generator (np.random.permutation)."""
    a, b = steps(stream(rows), 200), steps(stream(rows), 200)
    assert a == b
    assert steps(stream(rows, seed=4), 200) != a


def test_resumes_mid_epoch_and_mid_group(rows):
    """Stopped at step 50 (inside a group of 4 batches: 50 = 12 x 4 + 2) and reloaded from the JSON state,
    the stream continues with exactly the steps the uninterrupted one takes, across the epoch boundary (125).
    Mutation seen caught: group index computed from the offset in rows instead of steps (offset // G
    dropped)."""
    s = stream(rows)
    steps(s, 50)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["batching"] == "length_grouped" and state["group_size"] == 4
    expected = steps(s, 100)
    t = stream(rows)
    t.load_state_dict(state)
    assert steps(t, 100) == expected


def test_resume_with_another_batching_is_refused(rows):
    """Another order would repeat some of the epoch's rows and skip others. Mutation seen caught: the
    group_size comparison removed."""
    s = stream(rows)
    steps(s, 10)
    state = s.state_dict()
    with pytest.raises(
        DataError, match="data.batching=length_grouped, data.group_size=4; this run has data.batching=random"
    ):
        stream(rows, batching="random").load_state_dict(state)
    with pytest.raises(
        DataError, match="data.group_size=4; this run has data.batching=length_grouped, data.group_size=8"
    ):
        stream(rows, group_size=8).load_state_dict(state)
    old = {"epoch": 0, "offset": 80, "samples_per_epoch": len(rows)}  # a checkpoint from before the option
    with pytest.raises(DataError, match="data.batching=random; this run has data.batching=length_grouped"):
        stream(rows).load_state_dict(old)
    r = stream(rows, batching="random")
    r.load_state_dict(old)
    assert r.state_dict() == old  # a random run's position reads and writes as before


@pytest.mark.parametrize("group_size", [1, 4, 200])  # 200 > the 125 steps of an epoch: one partial group
def test_each_row_once_per_epoch_the_same_rows_and_task_counts_as_random(rows, group_size):
    """An epoch trains the rows of the random order's epoch (the same permutation prefix; 1000 rows, 125
    steps of 8: none dropped here), each once, so per-task counts per epoch are identical. Mutation seen
    caught: groups cut from perm[first * G * M:] (the group index scaled twice), which repeats and skips rows."""
    grouped, rand = stream(rows, group_size=group_size), stream(rows, batching="random")
    tasks = np.asarray(rows["task_id"])
    for epoch in range(2):
        got = [i for step in steps(grouped, 125) for i in flat(step)]
        want = [i for step in steps(rand, 125) for i in flat(step)]
        assert len(got) == len(set(got)) == 1000
        assert sorted(got) == sorted(want)
        assert Counter(tasks[got].tolist()) == Counter(tasks[want].tolist())
        assert got != want
    assert grouped.state_dict()["epoch"] == rand.state_dict()["epoch"] == 1


def test_an_epoch_remainder_is_dropped_as_in_random_order(rows):
    """G = 12: 83 steps per epoch, 4 rows dropped: the same 4 as the random order drops. Mutation seen
    caught: groups taken from the end of the permutation (which drops its first rows instead)."""
    grouped, rand = stream(rows, micro=6, group_size=5), stream(rows, batching="random", micro=6)
    got = {i for step in steps(grouped, 83) for i in flat(step)}
    want = {i for step in steps(rand, 83) for i in flat(step)}
    assert got == want and len(got) == 996
    assert grouped.step_indices() != rand.step_indices()  # and the next step starts epoch 1 in both
    assert grouped.state_dict()["epoch"] == 1


def padding(ds, s, count):
    lengths = row_lengths(ds)
    useful = slots = 0
    for step in steps(s, count):
        for mb in step:
            li, lt = lengths[mb, 0], lengths[mb, 1]
            useful += li.sum() + lt.sum()
            slots += len(mb) * (li.max() + lt.max())
    return 1 - useful / slots


def test_padding_is_lower_on_a_skewed_length_distribution(rows):
    """Input + target padding of micro-batches of 4 over an epoch (measured: random 0.41, grouped 0.08).
    Mutation seen caught: sorting the group by target length alone."""
    rand = padding(rows, stream(rows, batching="random"), 125)
    grouped = padding(rows, stream(rows, group_size=8), 125)
    assert rand > 0.3 and grouped < 0.12, (rand, grouped)


def test_row_lengths_read_from_arrow_match_the_rows_and_follow_a_selection(rows):
    """The Arrow path honours a dataset's index mapping (select/shuffle) and agrees with the row-by-row path
    other row containers take. Mutation seen caught: reading ds.data (the unselected table) directly."""
    picked = rows.select([5, 3, 999, 0])
    assert row_lengths(picked).tolist() == [[len(r["input_ids"]), len(r["target_ids"])] for r in picked]

    class Listed:  # what adaptation passes the engine: rows[list] -> columns
        column_names = ["task_id", "input_ids"]

        def __len__(self):
            return 3

        def __getitem__(self, idx):
            return {"task_id": [0] * len(idx), "input_ids": [[1] * (i + 2) for i in idx]}

    assert row_lengths(Listed()).tolist() == [[2, 0], [3, 0], [4, 0]]
    with pytest.raises(DataError, match="needs an input_ids column"):
        row_lengths(rows.select_columns(["task_id"]))


def test_bad_option_values_are_refused_naming_the_field(tmp_path):
    """Mutation seen caught: the data.batching check in config.validate disabled."""
    with pytest.raises(
        RunConfigError,
        match=r"key 'data.batching' = 'sorted': valid values: random, "
        r"length_grouped",
    ):
        load_run_config([], ["data.batching=sorted"])
    with pytest.raises(RunConfigError, match=r"key 'data.group_size' = 0: must be >= 1"):
        load_run_config([], ["data.group_size=0"])
    with pytest.raises(RunConfigError, match=r"data.group_size.*expected an integer"):
        load_run_config([], ["data.group_size=many"])
    with pytest.raises(RunConfigError, match="unknown key 'data.max_tokens'"):
        load_run_config([], ["data.max_tokens=4096"])
    with pytest.raises(DataError, match="batching 'sorted'"):
        TrainStream([{}] * 8, seed=0, micro_batch=1, grad_accum=1, batching="sorted")


def test_t0_configs_group_by_length_and_the_others_keep_the_random_order():
    """A published protocol keeps its data order: tiny_cpu (the tests' runs) and anything built from the
    defaults (configs/replicate write their run configs from them) stay random. Mutation seen caught:
    base_t0_3b.yaml set back to random."""
    pre = REPO / "configs" / "pretrain"
    base, big = pre / "base_t0_3b.yaml", pre / "base_t0_11b.yaml"
    for method in sorted(pre.glob("*.yaml")):
        if method.name in ("base_t0_3b.yaml", "base_t0_11b.yaml", "tiny_cpu.yaml"):
            continue
        for paths in ([base, method], [base, big, method]):
            assert load_run_config(paths, ["data.dir=/x"]).data.batching == "length_grouped", paths
    assert load_run_config([big], ["data.dir=/x"]).data.batching == "length_grouped"
    assert load_run_config([pre / "tiny_cpu.yaml"], ["data.dir=/x"]).data.batching == "random"
    assert load_run_config([], []).data.batching == "random"
