"""Answer confusion on the latent-skill benchmark (tensorpoly_ds.analysis.answer_confusion).

Mutations tried, each caught by the test named:
- classify() returning another class for a wrong position word: test_hand_built_shares;
- _rank_of() counting ties against the right answer (sum of <=): test_hand_built_shares (a tie in example B);
- the chance of a class counted only for the chosen candidate: test_hand_built_shares;
- rows_confusion keeping example_id > dev_examples (drops the first test row): test_rows_pool_seeds_and_drop_dev;
- the label consistency check removed: test_label_that_disagrees_with_the_eval_row;
- blind_correct as 1 / (number of candidates) instead of 1 / ((n_wp + 1)(n_wc + 1)): test_hand_built_shares,
  test_task_blind_additive_scorer_matches_its_expectation;
- data_prep/latent_skills.py drawing the wrong-position distractors as answer(p', c') (both families wrong):
  test_every_distractor_is_a_training_answer.
"""

import json
import random

import pytest

from data_prep import latent_skills as ls
from tensorpoly_ds.analysis import answer_confusion as ac
from tensorpoly_ds.analysis.answer_confusion import AnswerConfusionError, Example

TRUTH = ls.ground_truth("latent_skills")
HELD = [ls.dataset_name("latent_skills", p, c) for p, c in ls.HELD_OUT]
TASK = "ls_first_animal"
WORDS = ("fig", "cat", "saw", "one", "red")  # first fig, second cat, third saw, last red; answer "fig cat"
# A: 2 wrong-position distractors (saw cat, red cat), 1 wrong-category (fig saw)
# B: 1 wrong-position (cat cat), 2 wrong-category (fig red, fig fig)
EXAMPLES = {
    ("say", 0): Example(WORDS, ("fig cat", "saw cat", "fig saw", "red cat"), 0),
    ("say", 1): Example(WORDS, ("fig red", "fig fig", "fig cat", "cat cat"), 2),
}


def record(template, example_id, label, prediction, scores, task=TASK):
    return {
        "task_name": task,
        "template": template,
        "example_id": example_id,
        "label": label,
        "prediction": prediction,
        "scores": scores,
        "correct": prediction == label,
    }


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


HAND_BUILT = [
    record("say", 0, 0, 0, [1.0, 2.0, 3.0, 4.0]),  # correct, right answer rank 1
    record("say", 0, 0, 1, [4.0, 1.0, 2.0, 3.0]),  # "saw cat": wrong position (third), right ranked last
    record("say", 1, 2, 0, [1.0, 2.0, 2.0, 3.0]),  # "fig red": wrong category (colour); the right answer ties
    # with "fig fig" and the tie counts in its favour: rank 2
    record("say", 1, 2, 3, [2.0, 3.0, 1.5, 1.0]),  # "cat cat": wrong position (second), right rank 2
]


def test_hand_built_shares(tmp_path):
    counts = ac.predictions_confusion(write(tmp_path / "predictions.jsonl", HAND_BUILT), EXAMPLES, TRUTH, TASK, HELD)
    t = ac.confusion_table(counts)
    assert t["n"] == 4
    assert t["shares"] == pytest.approx({"correct": 0.25, "wrong_position": 0.5, "wrong_category": 0.25, "other": 0.0})
    # uniform guess: A gives (1/4, 2/4, 1/4), B (1/4, 1/4, 2/4), two records each
    assert t["chance"] == pytest.approx(
        {"correct": 0.25, "wrong_position": 0.375, "wrong_category": 0.375, "other": 0.0}
    )
    assert t["wrong_skill"] == pytest.approx({"position:third": 0.25, "category:colour": 0.25, "position:second": 0.25})
    assert t["trained_pair"] == pytest.approx(0.75) and t["trained_pair_chance"] == pytest.approx(0.75)
    assert t["right_rank"] == pytest.approx((1 + 4 + 2 + 2) / 4) and t["right_rank_chance"] == pytest.approx(2.5)
    assert t["right_last"] == pytest.approx(0.25)
    assert t["blind_correct"] == pytest.approx(1 / 6)  # 2 + 1 and 1 + 2 mixes: 1 / (3 * 2)


def test_every_distractor_is_a_training_answer(tmp_path):
    """The benchmark property the C4 diagnosis rests on, through the analysis: on the generator's own eval rows
    every wrong candidate is one family away and a training composition's answer, the right one never is."""
    records, examples = [], {}
    for template in ls.HELD_TEMPLATES["latent_skills"]:
        for i, row in enumerate(ls.records(f"{TASK}_{template}", "validation")):
            ex = Example(
                ac.sequence_words(row["inputs_pretokenized"]),
                tuple(row["answer_choices"]),
                row["answer_choices"].index(row["targets_pretokenized"]),
            )
            examples[(template, i)] = ex
            wrong = [j for j in range(len(ex.choices)) if j != ex.label]
            records.append(record(template, i, ex.label, random.Random(i).choice(wrong), [0.0] * 4))
    t = ac.confusion_table(ac.predictions_confusion(write(tmp_path / "p.jsonl", records), examples, TRUTH, TASK, HELD))
    assert t["n"] == 2 * ls.HELD_EVAL_SIZE
    assert t["shares"]["correct"] == 0 and t["shares"]["other"] == 0 and t["chance"]["other"] == 0
    assert t["trained_pair"] == 1.0
    assert t["trained_pair_chance"] == pytest.approx(0.75)
    assert t["chance"]["correct"] == pytest.approx(0.25)


def test_task_blind_additive_scorer_matches_its_expectation(tmp_path):
    """A scorer adding random task-independent word preferences, drawn afresh for every example, picks the right
    answer as often as blind_correct says. 10 draws x 300 examples: the standard error of the accuracy is
    about 0.007, the tolerance 0.03 (the draws are seeded, so the test is deterministic)."""
    rng, records, examples = random.Random(0), [], {}
    for template in ls.HELD_TEMPLATES["latent_skills"]:
        for i, row in enumerate(ls.records(f"{TASK}_{template}", "validation")):
            ex = Example(
                ac.sequence_words(row["inputs_pretokenized"]),
                tuple(row["answer_choices"]),
                row["answer_choices"].index(row["targets_pretokenized"]),
            )
            for draw in range(10):
                examples[(template, 1000 * draw + i)] = ex
                f, g = {w: rng.random() for w in ls.WORDS}, {w: rng.random() for w in ls.WORDS}
                scores = [-(f[c.split()[0]] + g[c.split()[1]]) for c in ex.choices]  # lower is better
                records.append(record(template, 1000 * draw + i, ex.label, scores.index(min(scores)), scores))
    t = ac.confusion_table(ac.predictions_confusion(write(tmp_path / "p.jsonl", records), examples, TRUTH, TASK, HELD))
    assert t["blind_correct"] < t["chance"]["correct"] - 0.05
    assert t["shares"]["correct"] == pytest.approx(t["blind_correct"], abs=0.03)


def test_rows_pool_seeds_and_drop_dev(tmp_path, monkeypatch):
    monkeypatch.setattr(ac, "load_examples", lambda data_dir, task: EXAMPLES)
    results = []
    for seed, recs in enumerate([HAND_BUILT[:2], HAND_BUILT[2:]]):
        job = tmp_path / f"job{seed}"
        job.mkdir()
        write(job / "predictions.jsonl", recs)
        results.append({"row": "Poly (mu, 0-shot)", "task": TASK, "_dir": str(job), "job": {"data_dir": "d"}})
    both = ac.rows_confusion(results, TRUTH, HELD, dev_examples=0)["Poly (mu, 0-shot)"]
    assert both["all"]["n"] == 4 and both[TASK]["shares"]["wrong_position"] == pytest.approx(0.5)
    test_only = ac.rows_confusion(results, TRUTH, HELD, dev_examples=1)["Poly (mu, 0-shot)"]["all"]
    assert test_only["n"] == 2  # example_id 0 is dev: only B's two records are left
    assert test_only["shares"]["wrong_category"] == pytest.approx(0.5)
    md = ac.confusion_markdown({"Poly (mu, 0-shot)": both})
    assert "| Poly (mu, 0-shot) | **all** | 4 | 25.0 (25.0) | 16.7 | 50.0 (37.5) | 25.0 (37.5) |" in md


def test_missing_field_names_file_and_field(tmp_path):
    bad = {k: v for k, v in HAND_BUILT[0].items() if k != "prediction"}
    path = write(tmp_path / "predictions.jsonl", [HAND_BUILT[1], bad])
    with pytest.raises(AnswerConfusionError, match=r"predictions\.jsonl: line 2 has no field 'prediction'"):
        ac.predictions_confusion(path, EXAMPLES, TRUTH, TASK, HELD)


def test_unknown_task_names_file_and_task(tmp_path):
    path = write(tmp_path / "predictions.jsonl", [record("say", 0, 0, 0, [0.0] * 4, task="ls_nowhere")])
    with pytest.raises(
        AnswerConfusionError,
        match=r"predictions\.jsonl: task 'ls_nowhere' is not in "
        r"latent_skills\.task_skills",
    ):
        ac.predictions_confusion(path, EXAMPLES, TRUTH, "ls_nowhere", HELD)


def test_unknown_example_and_other_task_in_file(tmp_path):
    path = write(tmp_path / "predictions.jsonl", [record("say", 7, 0, 0, [0.0] * 4)])
    with pytest.raises(AnswerConfusionError, match=r"line 1: no eval row with template 'say' and example_id 7"):
        ac.predictions_confusion(path, EXAMPLES, TRUTH, TASK, HELD)
    path = write(tmp_path / "predictions.jsonl", [record("say", 0, 0, 0, [0.0] * 4, task="ls_second_fruit")])
    with pytest.raises(AnswerConfusionError, match=r"line 1: task_name 'ls_second_fruit', expected 'ls_first_animal'"):
        ac.predictions_confusion(path, EXAMPLES, TRUTH, TASK, HELD)


def test_label_that_disagrees_with_the_eval_row(tmp_path):
    path = write(tmp_path / "predictions.jsonl", [record("say", 0, 1, 0, [0.0] * 4)])
    with pytest.raises(AnswerConfusionError, match=r"field 'label' is 1, the eval row says 0"):
        ac.predictions_confusion(path, EXAMPLES, TRUTH, TASK, HELD)


def test_eval_rows_missing_a_field():
    rows = [{"template": "say", "example_id": 0, "input_ids": [1], "label": 0}]
    with pytest.raises(AnswerConfusionError, match=r"data/eval/t: row 0 has no field 'choice_ids'"):
        ac.examples_from_rows(rows, lambda ids: "", "data/eval/t")


def test_examples_from_rows_decodes_words_and_choices():
    vocab = {1: "fig", 2: "cat", 3: "saw", 4: "one", 5: "red", 6: ".", 7: "Say"}
    decode = lambda ids: " ".join(vocab[i] for i in ids)  # noqa: E731
    rows = [
        {
            "template": "say",
            "example_id": 3,
            "input_ids": [1, 2, 3, 4, 5, 6, 7],
            "choice_ids": [[1, 2], [3, 2]],
            "label": 0,
        }
    ]
    assert ac.examples_from_rows(rows, decode, "x") == {("say", 3): Example(WORDS, ("fig cat", "saw cat"), 0)}
