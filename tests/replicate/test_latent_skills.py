"""The latent-skill benchmark: its ground truth, its held-out split and its answer candidates."""

import random

import pytest

from data_prep import latent_skills as ls
from data_prep.mixture import get_mixture


@pytest.mark.parametrize("name", ["latent_skills", "latent_skills_noprompt"])
def test_held_out_tasks_are_unseen_compositions_of_seen_skills(name):
    truth = ls.ground_truth(name)
    m = get_mixture(name)
    train_sets = {tuple(truth["task_skills"][t.task]) for t in m.train}
    for h in m.held_out:
        skills = truth["task_skills"][h.name]
        assert tuple(skills) not in train_sets  # unseen composition
        for s in skills:  # of skills seen in training
            assert sum(s in combo for combo in train_sets) >= 2
    assert all(len(truth["task_skills"][t.task]) == 2 for t in m.train)
    assert set(truth["skills"]) == {s for v in truth["task_skills"].values() for s in v}
    assert m.manifest_extra["latent_skills"] == truth


def test_every_distractor_differs_from_the_answer_in_exactly_one_family():
    rng = random.Random(0)
    for _ in range(300):
        words = ls._sequence(rng)
        assert len(set(words)) == len(words)
        assert sorted(ls.CATEGORY_OF[w] for w in words if ls.CATEGORY_OF[w] != "filler") == sorted(ls.CATEGORIES)
        for p, c in ls.HELD_OUT:
            choices, label = ls._candidates(p, c, words, rng)
            right = ls.answer(p, c, words)
            assert choices[label] == right and len(set(choices)) == ls.N_CHOICES
            for choice in choices:
                if choice != right:
                    assert sum(a != b for a, b in zip(choice.split(), right.split())) == 1


def test_records_are_deterministic_and_splits_disjoint():
    name = ls.dataset_name("latent_skills_noprompt", *ls.HELD_OUT[0])
    config = f"{name}_plain"
    ev, pool = ls.records(config, "validation"), ls.records(config, "train")
    assert ev == ls.records(config, "validation")
    assert len(ev) == ls.HELD_EVAL_SIZE and len(pool) == ls.HELD_POOL_SIZE
    assert not {r["inputs_pretokenized"] for r in ev} & {r["inputs_pretokenized"] for r in pool}
    # the prompts differ between the variants, the examples and candidates do not
    other = ls.records(f"{ls.dataset_name('latent_skills', *ls.HELD_OUT[0])}_say", "validation")
    assert [r["answer_choices"] for r in other] == [r["answer_choices"] for r in ev]


def test_noprompt_prompts_do_not_name_skills_and_use_the_prompt_variant_vocabulary():
    vocab = set()
    for config in ls.config_names():
        if config.startswith("ls_"):
            for r in ls.records(config, "train")[:20] + ls.records(config, "validation")[:20]:
                vocab.update(r["inputs_pretokenized"].split())
    for config in ls.config_names():
        if config.startswith("lsn_"):
            for r in ls.records(config, "train")[:20] + ls.records(config, "validation")[:20]:
                text = r["inputs_pretokenized"]
                assert not any(w in text.split() for w in ("first", "second", "third", "last", "animal", "fruit"))
                assert set(text.split()) <= vocab


def test_generic_corpus_is_reproducible_and_never_a_task():
    a, b = ls.generic_corpus(200, 3), ls.generic_corpus(200, 3)
    assert a == b and a != ls.generic_corpus(200, 4)
    assert all(3 <= len(s) <= 10 for s in a)
    assert {w for s in a for w in s} <= set(ls.WORDS)
    extra = ls.generic_corpus(500, 3, other_words=("Say", "word"))
    assert {"Say", "word"} & {w for s in extra for w in s}
