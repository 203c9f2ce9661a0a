"""The embedded mixture: a small offline stand-in for P3 built from shared latent skills.

Every task applies two simple word-sequence transformations in a row ("skills"), described
in words by its prompt. Training datasets are some compositions; held-out tasks are unseen
compositions of the same skills, posed as classification (Yes/No or pick the right candidate),
so few-shot adaptation has something real to transfer. Records use the P3 format
(inputs_pretokenized, targets_pretokenized, answer_choices) and are generated deterministically
(random.Random seeded with a string key: sha512-based, independent of PYTHONHASHSEED).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .mixture import HeldOutTask, Mixture, TrainTemplate

WORDS = (
    "apple bird cloud dog eagle fish grape horse island jelly kite lemon moon nut ocean pear "
    "queen river snow tiger umbrella violin whale yarn zebra bean cake door egg fox goat hat ink"
).split()

OPS: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "reverse": (lambda w: w[::-1], "reverse the order of the words"),
    "sort": (lambda w: sorted(w, key=str.lower), "sort the words alphabetically"),
    "first3": (lambda w: w[:3], "keep only the first three words"),
    "drop_first": (lambda w: w[1:], "remove the first word"),
    "upper_first": (lambda w: [w[0].upper()] + w[1:], "write the first word in capitals"),
    "count": (lambda w: [str(len(w))], "count the words"),
}

# (first skill, second skill, templates). 16 training tasks in total.
TRAIN_DATASETS = (
    ("reverse", "upper_first", ("instruction", "question", "verify")),
    ("sort", "first3", ("instruction", "question")),
    ("drop_first", "reverse", ("instruction", "question", "verify")),
    ("upper_first", "sort", ("instruction", "question")),
    ("first3", "reverse", ("instruction", "question")),
    ("drop_first", "count", ("instruction", "question")),
    ("reverse", "drop_first", ("instruction", "question")),
)
# (first, second, number of answer choices, templates, default few-shot k): unseen compositions.
HELD_OUT = (
    ("sort", "reverse", 2, ("verify", "is_it_right"), 16),
    ("drop_first", "upper_first", 3, ("pick_one", "which_candidate"), 32),
    ("reverse", "first3", 4, ("pick_one", "which_candidate"), 32),
)
TRAIN_SIZE = 500  # per training dataset (every template renders the same examples)
HELD_TRAIN_SIZE = 200  # few-shot pool per held-out task
HELD_EVAL_SIZE = 100  # evaluation examples per held-out task
SPLITS = ("train", "validation")


def dataset_name(first: str, second: str) -> str:
    return f"emb_{first}_then_{second}"


def mixture(name: str = "embedded") -> Mixture:
    train = []
    for first, second, templates in TRAIN_DATASETS:
        ds = dataset_name(first, second)
        for t in templates:
            train.append(TrainTemplate(f"{ds}_{t}", ds, t, len(templates)))
    held = tuple(
        HeldOutTask(
            name=dataset_name(first, second),
            templates=tuple((t, f"{dataset_name(first, second)}_{t}") for t in templates),
            eval_split="validation",
            few_shot_split="train",
            few_shot_k=k,
            on_hub=False,
        )
        for first, second, _, templates, k in HELD_OUT
    )
    return Mixture(
        name,
        tuple(train),
        held,
        "embedded: 16 training tasks (7 two-skill compositions x 2-3 templates), "
        "3 held-out unseen compositions as classification",
    )


def _apply(first: str, second: str, words: list[str]) -> list[str]:
    return OPS[second][0](OPS[first][0](words))


def _sequences(rng: random.Random, n: int, lo: int, hi: int, seen: set) -> list[list[str]]:
    out = []
    while len(out) < n:
        w = rng.sample(WORDS, rng.randint(lo, hi))
        if tuple(w) not in seen:  # keeps held-out eval and few-shot pools disjoint
            seen.add(tuple(w))
            out.append(w)
    return out


def _distractors(first: str, second: str, words: list[str], rng: random.Random) -> list[str]:
    """Plausible wrong answers: other skill compositions and single skills on the same words."""
    correct = " ".join(_apply(first, second, words))
    names = [o for o in OPS if o != "count"]
    cands = [" ".join(words)]
    cands += [" ".join(OPS[o][0](words)) for o in names]
    cands += [" ".join(_apply(a, b, words)) for a in names for b in names if (a, b) != (first, second)]
    uniq = sorted({c for c in cands if c != correct})
    rng.shuffle(uniq)
    return uniq


def _render(
    config_key: str, template: str, first: str, second: str, words: list[str], rng: random.Random, n_choices: int
) -> dict:
    d1, d2 = OPS[first][1], OPS[second][1]
    seq = " ".join(words)
    answer = " ".join(_apply(first, second, words))
    if template == "instruction":
        return {"inputs_pretokenized": f"{d1.capitalize()}, then {d2}: {seq}", "targets_pretokenized": answer}
    if template == "question":
        return {
            "inputs_pretokenized": f"Words: {seq}\nWhat do you get if you {d1} and then {d2}?",
            "targets_pretokenized": answer,
        }
    if template in ("verify", "is_it_right"):
        yes = rng.random() < 0.5
        cand = answer if yes else _distractors(first, second, words, rng)[0]
        if template == "verify":
            text = (
                f"Words: {seq}\nCandidate: {cand}\nIs the candidate what you get if you {d1} and then {d2}? Yes or No?"
            )
        else:
            text = (
                f"Someone was asked to {d1} and then {d2} for: {seq}. They answered: {cand}. Is that right? Yes or No?"
            )
        return {
            "inputs_pretokenized": text,
            "targets_pretokenized": "Yes" if yes else "No",
            "answer_choices": ["Yes", "No"],
        }
    if template in ("pick_one", "which_candidate"):
        options = _distractors(first, second, words, rng)[: n_choices - 1] + [answer]
        rng.shuffle(options)
        if template == "pick_one":
            text = (
                f"Words: {seq}\nWhich option is what you get if you {d1} and then {d2}?\nOptions: {' | '.join(options)}"
            )
        else:
            text = f"{d1.capitalize()}, then {d2}: {seq}\nChoose one: {' | '.join(options)}"
        return {"inputs_pretokenized": text, "targets_pretokenized": answer, "answer_choices": options}
    raise KeyError(f"{config_key}: unknown embedded template {template!r}")


def _index() -> dict[str, tuple]:
    idx = {}
    for first, second, templates in TRAIN_DATASETS:
        for t in templates:
            idx[f"{dataset_name(first, second)}_{t}"] = ("train", first, second, t, 2)
    for first, second, n, templates, _ in HELD_OUT:
        for t in templates:
            idx[f"{dataset_name(first, second)}_{t}"] = ("held", first, second, t, n)
    return idx


def config_names() -> list[str]:
    return list(_index())


def splits(config: str) -> tuple[str, ...]:
    return ("train",) if _index()[config][0] == "train" else SPLITS


def records(config: str, split: str) -> list[dict]:
    """P3-format records of one embedded config and split (deterministic)."""
    kind, first, second, template, n_choices = _index()[config]
    ds = dataset_name(first, second)
    if kind == "train":
        if split != "train":
            return []
        examples = _sequences(random.Random(f"embedded|{ds}|examples"), TRAIN_SIZE, 4, 7, set())
    else:
        # One pool per held-out task, validation first, so the splits never share a sequence.
        pool = _sequences(random.Random(f"embedded|{ds}|examples"), HELD_EVAL_SIZE + HELD_TRAIN_SIZE, 4, 6, set())
        examples = pool[:HELD_EVAL_SIZE] if split == "validation" else pool[HELD_EVAL_SIZE:]
    rng = random.Random(f"embedded|{config}|{split}|render")
    return [_render(config, template, first, second, w, rng, n_choices) for w in examples]
