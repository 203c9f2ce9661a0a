"""The latent-skill benchmark: tasks that are known compositions of separable skills.

Every input is a short sequence of distinct words: one animal, one fruit, one tool and one colour,
shuffled among one to three filler words (numbers). A task combines one skill of each family, and each family governs its own part of the
two-word answer:

    position family  (first word of the answer):  the first / second / third / last word
    category family  (second word of the answer): the animal / fruit / tool / colour

so 4 x 4 = 16 compositions, 8 latent skills, and the ground-truth task x skill matrix has two ones per
row. Twelve compositions are training datasets (every template of a dataset is one task, as in P3);
the four held-out tasks are the unseen compositions on the diagonal of the 4 x 4 grid, so each of
their skills was seen in three training compositions, never together. Held-out tasks are rank
classification over four candidates: the answer and three answers that differ from it in exactly
one family (so guessing one family right is not enough; chance is 25 %).

Two mixtures share the examples and differ only in the prompts:
  latent_skills           the prompt names the two skills in words (the T0 situation);
  latent_skills_noprompt  the prompt only shows the words: a task is known through its id (training)
                          or its examples (few-shot), which is where routing should matter most.

Evaluation rows of a held-out task with example_id < DEV_EXAMPLES form its dev split (choosing
hyper-parameters); the others are the test split. `ground_truth(name)` is written into the
manifest under "latent_skills". `generic_corpus` gives word sequences over the same vocabulary,
never the tasks, for pretraining the stand-in backbone (the T5-LM analogue).
Records use the P3 format and are generated deterministically (random.Random seeded with strings).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .mixture import HeldOutTask, Mixture, TrainTemplate

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "fox", "owl", "bee", "yak"),
    "fruit": ("fig", "lime", "pear", "plum", "kiwi", "date"),
    "tool": ("saw", "axe", "hoe", "rake", "drill", "vise"),
    "colour": ("red", "blue", "gold", "pink", "teal", "gray"),
}
FILLERS = ("one", "two", "six", "ten", "zero", "nine")  # words of no category the tasks ask for
WORDS = tuple(w for ws in CATEGORIES.values() for w in ws) + FILLERS
CATEGORY_OF = {w: c for c, ws in CATEGORIES.items() for w in ws}
CATEGORY_OF.update({w: "filler" for w in FILLERS})

# family -> skill -> (function of the word list, phrase used by the describing prompts)
POSITION: dict[str, tuple[Callable[[list[str]], str], str]] = {
    "first": (lambda w: w[0], "the first word"),
    "second": (lambda w: w[1], "the second word"),
    "third": (lambda w: w[2], "the third word"),
    "last": (lambda w: w[-1], "the last word"),
}
CATEGORY: dict[str, tuple[Callable[[list[str]], str], str]] = {
    c: ((lambda w, c=c: next(x for x in w if CATEGORY_OF[x] == c)), f"the {c}") for c in CATEGORIES
}
FAMILIES = {"position": POSITION, "category": CATEGORY}
SKILLS = tuple(f"{fam}:{s}" for fam, skills in FAMILIES.items() for s in skills)

HELD_OUT = (("first", "animal"), ("second", "fruit"), ("third", "tool"), ("last", "colour"))
TRAIN = tuple((p, c) for p in POSITION for c in CATEGORY if (p, c) not in HELD_OUT)

TRAIN_TEMPLATES = {
    "latent_skills": ("say", "question", "terse"),
    "latent_skills_noprompt": ("plain", "words", "colon"),
}
HELD_TEMPLATES = {
    "latent_skills": ("say", "question"),
    "latent_skills_noprompt": ("plain", "words"),
}
PREFIX = {"latent_skills": "ls", "latent_skills_noprompt": "lsn"}
TRAIN_SIZE = 600  # examples per training composition (every template renders the same ones)
HELD_EVAL_SIZE = 150  # evaluation examples per held-out task: DEV_EXAMPLES dev + the rest test
DEV_EXAMPLES = 50
HELD_POOL_SIZE = 200  # few-shot pool per held-out task (its train split)
N_CHOICES = 4
DEFAULT_K = 16
MIN_LEN, MAX_LEN = 5, 7


def dataset_name(mixture_name: str, position: str, category: str) -> str:
    return f"{PREFIX[mixture_name]}_{position}_{category}"


def task_skills(position: str, category: str) -> list[str]:
    return [f"position:{position}", f"category:{category}"]


def mixture(name: str) -> Mixture:
    train = []
    for p, c in TRAIN:
        ds = dataset_name(name, p, c)
        templates = TRAIN_TEMPLATES[name]
        train += [TrainTemplate(f"{ds}_{t}", ds, t, len(templates)) for t in templates]
    held = tuple(
        HeldOutTask(
            name=dataset_name(name, p, c),
            templates=tuple((t, f"{dataset_name(name, p, c)}_{t}") for t in HELD_TEMPLATES[name]),
            eval_split="validation",
            few_shot_split="train",
            few_shot_k=DEFAULT_K,
            on_hub=False,
        )
        for p, c in HELD_OUT
    )
    desc = (
        f"{name}: {len(TRAIN)} training compositions x {len(TRAIN_TEMPLATES[name])} templates of 2 of 8 "
        f"latent skills, {len(HELD_OUT)} held-out unseen compositions as 4-way rank classification"
    )
    return Mixture(name, tuple(train), held, desc, manifest_extra={"latent_skills": ground_truth(name)})


def ground_truth(name: str) -> dict:
    """The manifest's "latent_skills" block: skills, task -> skills for every task name, the dev rule."""
    tasks = {}
    for p, c in TRAIN:
        for t in TRAIN_TEMPLATES[name]:
            tasks[f"{dataset_name(name, p, c)}_{t}"] = task_skills(p, c)
    for p, c in HELD_OUT:
        tasks[dataset_name(name, p, c)] = task_skills(p, c)
    return {
        "skills": list(SKILLS),
        "families": {f: list(s) for f, s in FAMILIES.items()},
        "task_skills": tasks,
        "dev_examples": DEV_EXAMPLES,
        "dev_rule": f"held-out eval rows with example_id < {DEV_EXAMPLES} are the dev split, the rest the test split",
        "chance": 1.0 / N_CHOICES,
    }


# --- examples ----------------------------------------------------------------------------------------------


def _sequence(rng: random.Random) -> list[str]:
    """One word of every category plus distinct fillers, in random order."""
    n = rng.randint(MIN_LEN, MAX_LEN)
    words = [rng.choice(ws) for ws in CATEGORIES.values()] + rng.sample(FILLERS, n - len(CATEGORIES))
    rng.shuffle(words)
    return words


def _sequences(key: str, n: int) -> list[list[str]]:
    rng, seen, out = random.Random(key), set(), []
    while len(out) < n:
        w = _sequence(rng)
        if tuple(w) not in seen:
            seen.add(tuple(w))
            out.append(w)
    return out


def answer(position: str, category: str, words: list[str]) -> str:
    return f"{POSITION[position][0](words)} {CATEGORY[category][0](words)}"


def _candidates(position: str, category: str, words: list[str], rng: random.Random) -> tuple[list[str], int]:
    """The answer and N_CHOICES - 1 answers that differ from it in exactly one family, shuffled."""
    right = answer(position, category, words)
    near = sorted(
        {answer(p, category, words) for p in POSITION if p != position}
        | {answer(position, c, words) for c in CATEGORY if c != category}
    )
    near = [a for a in near if a != right]  # a position and a category can pick the same word
    choices = rng.sample(near, N_CHOICES - 1) + [right]
    rng.shuffle(choices)
    return choices, choices.index(right)


def _prompt(template: str, position: str, category: str, words: list[str]) -> str:
    seq = " ".join(words)
    p, c = POSITION[position][1], CATEGORY[category][1]
    texts = {
        "say": f"{seq} . Say {p} and then {c} .",
        "question": f"Words : {seq} . What are {p} and {c} ?",
        "terse": f"{p} , {c} : {seq}",
        "plain": seq,
        "words": f"Words : {seq} .",
        "colon": f"{seq} :",
    }
    return texts[template]


def _index() -> dict[str, tuple]:
    idx = {}
    for name in TRAIN_TEMPLATES:
        for p, c in TRAIN:
            for t in TRAIN_TEMPLATES[name]:
                idx[f"{dataset_name(name, p, c)}_{t}"] = ("train", p, c, t)
        for p, c in HELD_OUT:
            for t in HELD_TEMPLATES[name]:
                idx[f"{dataset_name(name, p, c)}_{t}"] = ("held", p, c, t)
    return idx


def config_names() -> list[str]:
    return list(_index())


def records(config: str, split: str) -> list[dict]:
    """P3-format records of one config and split (deterministic; both mixtures share the examples)."""
    kind, p, c, template = _index()[config]
    if kind == "train":
        if split != "train":
            return []
        examples = _sequences(f"latent_skills|{p}|{c}|train", TRAIN_SIZE)
        return [
            {"inputs_pretokenized": _prompt(template, p, c, w), "targets_pretokenized": answer(p, c, w)}
            for w in examples
        ]
    # one pool per held-out task, evaluation examples first, so the splits never share a sequence
    pool = _sequences(f"latent_skills|{p}|{c}|held", HELD_EVAL_SIZE + HELD_POOL_SIZE)
    examples = pool[:HELD_EVAL_SIZE] if split == "validation" else pool[HELD_EVAL_SIZE:]
    rng = random.Random(f"latent_skills|{p}|{c}|{split}|choices")  # the same candidates for every template
    out = []
    for w in examples:
        choices, label = _candidates(p, c, w, rng)
        out.append(
            {
                "inputs_pretokenized": _prompt(template, p, c, w),
                "targets_pretokenized": choices[label],
                "answer_choices": choices,
            }
        )
    return out


def splits(config: str) -> tuple[str, ...]:
    return ("train",) if _index()[config][0] == "train" else ("train", "validation")


def generic_corpus(n: int, seed: int, other_words: tuple[str, ...] = ()) -> list[list[str]]:
    """Word sequences over the benchmark's vocabulary with no task in them, for the T5-LM analogue. Each
    sequence draws most of its words from one or two categories (so that, as in natural text, context
    tells which words belong together), the rest from the whole vocabulary (`other_words`: the prompt
    words of the prepared tokenizer, so that no embedding stays untrained), in random order."""
    rng = random.Random(f"latent_skills|generic|{seed}")
    groups = {**CATEGORIES, "filler": FILLERS}
    cats = list(groups)
    anywhere = WORDS + tuple(w for w in other_words if w not in CATEGORY_OF)
    out = []
    for _ in range(n):
        main = rng.sample(cats, rng.choice((1, 2)))
        out.append(
            [
                rng.choice(groups[rng.choice(main)]) if rng.random() < 0.8 else rng.choice(anywhere)
                for _ in range(rng.randint(3, 10))
            ]
        )
    return out
