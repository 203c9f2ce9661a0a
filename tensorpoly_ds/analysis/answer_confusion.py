"""What a rank-classification job answered on the latent-skill benchmark, not only whether it was right.

    examples = load_examples(data_dir, task)              # the prepared eval rows, decoded
    counts = predictions_confusion(job_dir / "predictions.jsonl", examples, truth, task)
    table = confusion_table(counts)                        # shares, with what a uniform guess would give

The held-out tasks' candidates are the right answer and answers that differ from it in exactly one
family (data_prep/latent_skills.py, `_candidates`): the first word from another position skill
("wrong_position") or the second word from another category skill ("wrong_category"). Each chosen answer is
mapped back to the composition(s) (position, category) that produce it from the example's words, so a
table also says which skill the wrong word came from and whether the chosen pair is the answer of a
composition seen in training (`trained_pair`). Because the held-out compositions are the diagonal of the
4 x 4 grid, every one-family distractor is a training composition's answer: a model that prefers answers
of the kind it was trained on is pushed away from the right one (docs/replicate.md, "C4 diagnosed").

Chance columns are the expectation of a uniform guess over each example's own candidates (the mix of
distractor families varies per example). `right_rank` is the right answer's rank among the candidates by
score (1 = chosen; ties count in its favour), uniform guess (n + 1) / 2. `blind_correct` is the expected
accuracy of a *task-blind additive* scorer: one that scores a candidate as f(first word) + g(second word)
with preferences f, g that do not depend on the task (random, continuous). The candidates form a cross: the
right answer shares its first word with the wrong-category answers and its second word with the
wrong-position ones, so it wins only if its first word beats the other first words *and* its second word
beats the other second words: 1 / ((n_wrong_position + 1) (n_wrong_category + 1)), 1/6 for a 2 + 1 mix,
about 17.5 % over the benchmark's sampling of 3 of the 6 near answers, below the uniform 25 %.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tpds_common.errors import DataError

CLASSES = ("correct", "wrong_position", "wrong_category", "other")
RECORD_FIELDS = ("task_name", "template", "example_id", "label", "prediction", "scores")


class AnswerConfusionError(DataError):
    """Predictions, eval rows or ground truth that cannot be analysed; the message names file and field."""


@dataclass(frozen=True)
class Example:
    words: tuple[str, ...]  # the example's word sequence, in order
    choices: tuple[str, ...]  # candidate answers as text
    label: int


# --- one answer ---------------------------------------------------------------------------------------------


def sequence_words(text: str) -> tuple[str, ...]:
    """The benchmark words of an input, in order (prompt words are not benchmark words)."""
    from data_prep.latent_skills import CATEGORY_OF

    return tuple(w for w in text.split() if w in CATEGORY_OF)


def compositions_of(answer_text: str, words: Sequence[str]) -> list[tuple[str, str]]:
    """Every (position, category) whose answer on `words` is `answer_text` (the generator's own rule)."""
    from data_prep.latent_skills import CATEGORY, POSITION, answer

    out = []
    for p in POSITION:
        for c in CATEGORY:
            try:
                if answer(p, c, list(words)) == answer_text:
                    out.append((p, c))
            except (IndexError, StopIteration):  # words without that position / category
                continue
    return out


def classify(chosen: list[tuple[str, str]], right: tuple[str, str]) -> str:
    """CLASSES entry of a chosen answer given the compositions it could come from."""
    if right in chosen:
        return "correct"
    if any(c == right[1] and p != right[0] for p, c in chosen):
        return "wrong_position"
    if any(p == right[0] and c != right[1] for p, c in chosen):
        return "wrong_category"
    return "other"


# --- ground truth -------------------------------------------------------------------------------------------


def _split_skills(skills: Iterable[str], where: str) -> tuple[str, str]:
    by_family = {}
    for s in skills:
        fam, _, name = str(s).partition(":")
        by_family[fam] = name
    if set(by_family) != {"position", "category"}:
        raise AnswerConfusionError(f"{where}: skills {list(skills)} are not one position and one category skill")
    return by_family["position"], by_family["category"]


def task_composition(truth: dict, task: str, source: str = "manifest") -> tuple[str, str]:
    """(position, category) of a task from the manifest's `latent_skills` block."""
    table = truth.get("task_skills")
    if not isinstance(table, dict):
        raise AnswerConfusionError(f"{source}: latent_skills has no 'task_skills' table")
    if task not in table:
        raise AnswerConfusionError(f"{source}: task {task!r} is not in latent_skills.task_skills")
    return _split_skills(table[task], f"{source}: latent_skills.task_skills[{task!r}]")


def training_compositions(truth: dict, held_out: Iterable[str], source: str = "manifest") -> set[tuple[str, str]]:
    held = set(held_out)
    return {task_composition(truth, t, source) for t in truth.get("task_skills", {}) if t not in held}


# --- eval rows ----------------------------------------------------------------------------------------------


def examples_from_rows(rows: Iterable[dict], decode: Callable[[list[int]], str], source: str) -> dict:
    """{(template, example_id): Example} from prepared eval rows (input_ids, choice_ids, label)."""
    out = {}
    for i, row in enumerate(rows):
        for f in ("template", "example_id", "input_ids", "choice_ids", "label"):
            if f not in row:
                raise AnswerConfusionError(f"{source}: row {i} has no field {f!r}")
        out[(row["template"], int(row["example_id"]))] = Example(
            words=sequence_words(decode(row["input_ids"])),
            choices=tuple(decode(c).strip() for c in row["choice_ids"]),
            label=int(row["label"]),
        )
    return out


def load_examples(data_dir: str | Path, task: str) -> dict:
    """The prepared eval rows of `task` in `data_dir`, decoded with the data's own tokenizer."""
    from data_prep.manifest import read_manifest
    from data_prep.tokenizer import load_from_info

    from ..adapt.job import load_rows

    manifest = read_manifest(str(data_dir))
    tok = load_from_info(Path(data_dir), manifest.tokenizer["kind"], manifest.tokenizer["name_or_path"])
    return examples_from_rows(
        load_rows(str(data_dir), f"eval/{task}"),
        lambda ids: tok.decode(ids, skip_special_tokens=True),
        f"{data_dir}/eval/{task}",
    )


# --- one job ------------------------------------------------------------------------------------------------


def empty_counts() -> dict:
    return {
        "n": 0,
        "classes": Counter(),
        "chance": Counter(),
        "trained_pair": 0,
        "trained_pair_chance": 0.0,
        "wrong_skill": Counter(),
        "blind_correct": 0.0,
        "right_rank_sum": 0.0,
        "right_rank_chance_sum": 0.0,
        "right_last": 0,
        "right_last_chance": 0.0,
    }


def merge_counts(into: dict, other: dict) -> dict:
    for key, value in other.items():
        into[key] = into[key] + value  # Counter + Counter, number + number
    return into


def read_predictions(path: Path) -> list[dict]:
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnswerConfusionError(f"{path}: line {i} is not JSON ({err})") from None
        missing = [f for f in RECORD_FIELDS if f not in rec]
        if missing:
            raise AnswerConfusionError(f"{path}: line {i} has no field {missing[0]!r}")
        records.append(rec)
    return records


def _rank_of(scores: Sequence[float], j: int) -> int:
    """1 + the candidates scoring strictly better (lower) than candidate j."""
    return 1 + sum(s < scores[j] for s in scores)


def predictions_confusion(
    path: Path,
    examples: dict,
    truth: dict,
    task: str,
    held_out: Iterable[str] = (),
    keep: Callable[[dict], bool] = lambda rec: True,
) -> dict:
    """Counts (empty_counts() layout) over the kept records of one predictions.jsonl of held-out `task`."""
    right = task_composition(truth, task, str(path))
    trained = training_compositions(truth, set(held_out) | {task}, str(path))
    counts = empty_counts()
    for i, rec in enumerate(read_predictions(path), 1):
        if rec["task_name"] != task:
            raise AnswerConfusionError(f"{path}: line {i}: task_name {rec['task_name']!r}, expected {task!r}")
        if not keep(rec):
            continue
        key = (rec["template"], int(rec["example_id"]))
        ex = examples.get(key)
        if ex is None:
            raise AnswerConfusionError(
                f"{path}: line {i}: no eval row with template {key[0]!r} and example_id {key[1]} for task {task!r}"
            )
        _count_one(counts, rec, ex, right, trained, f"{path}: line {i}")
    return counts


def _count_one(counts: dict, rec: dict, ex: Example, right: tuple[str, str], trained: set, where: str) -> None:
    n, pred = len(ex.choices), int(rec["prediction"])
    if int(rec["label"]) != ex.label:
        raise AnswerConfusionError(f"{where}: field 'label' is {rec['label']}, the eval row says {ex.label}")
    if not 0 <= pred < n or len(rec["scores"]) != n:
        raise AnswerConfusionError(
            f"{where}: field 'prediction' {pred} / {len(rec['scores'])} scores do not fit {n} candidates"
        )
    if right not in compositions_of(ex.choices[ex.label], ex.words):
        raise AnswerConfusionError(
            f"{where}: the labelled answer {ex.choices[ex.label]!r} is not {right} on the words {' '.join(ex.words)!r}"
        )
    comps = [compositions_of(c, ex.words) for c in ex.choices]
    kinds = [classify(c, right) for c in comps]
    chosen = kinds[pred]
    counts["n"] += 1
    counts["classes"][chosen] += 1
    for kind in kinds:
        counts["chance"][kind] += 1 / n
    counts["blind_correct"] += 1 / ((kinds.count("wrong_position") + 1) * (kinds.count("wrong_category") + 1))
    counts["trained_pair"] += int(any(c in trained for c in comps[pred]))
    counts["trained_pair_chance"] += sum(any(c in trained for c in cs) for cs in comps) / n
    if chosen in ("wrong_position", "wrong_category"):
        fam = "position" if chosen == "wrong_position" else "category"
        wrong = {p if fam == "position" else c for p, c in comps[pred]} - {right[0] if fam == "position" else right[1]}
        counts["wrong_skill"][f"{fam}:{sorted(wrong)[0]}"] += 1
    rank = _rank_of(rec["scores"], ex.label)
    counts["right_rank_sum"] += rank
    counts["right_rank_chance_sum"] += (n + 1) / 2
    counts["right_last"] += int(rank == n)
    counts["right_last_chance"] += 1 / n


# --- tables -------------------------------------------------------------------------------------------------


def confusion_table(counts: dict) -> dict:
    """Shares of the counted predictions and the uniform-guess expectation of each."""
    n = counts["n"]
    if n == 0:
        return {"n": 0}
    return {
        "n": n,
        "shares": {k: counts["classes"][k] / n for k in CLASSES},
        "chance": {k: counts["chance"][k] / n for k in CLASSES},
        "trained_pair": counts["trained_pair"] / n,
        "trained_pair_chance": counts["trained_pair_chance"] / n,
        "wrong_skill": {k: v / n for k, v in sorted(counts["wrong_skill"].items())},
        "blind_correct": counts["blind_correct"] / n,
        "right_rank": counts["right_rank_sum"] / n,
        "right_rank_chance": counts["right_rank_chance_sum"] / n,
        "right_last": counts["right_last"] / n,
        "right_last_chance": counts["right_last_chance"] / n,
    }


def rows_confusion(results: Iterable[dict], truth: dict, held_out: Iterable[str], dev_examples: int = 0) -> dict:
    """{row name: {"all": table, task: table}} over the test rows (example_id >= dev_examples) of the given
    replicate results (each with 'row', 'task', '_dir' and its job's 'data_dir'), pooled over seeds."""
    held = list(held_out)
    cache: dict[tuple[str, str], dict] = {}
    per: dict[str, dict[str, dict]] = {}
    for r in results:
        task, data_dir = r["task"], r["job"]["data_dir"]
        if (data_dir, task) not in cache:
            cache[(data_dir, task)] = load_examples(data_dir, task)
        counts = predictions_confusion(
            Path(r["_dir"]) / "predictions.jsonl",
            cache[(data_dir, task)],
            truth,
            task,
            held,
            keep=lambda rec: int(rec["example_id"]) >= dev_examples,
        )
        row = per.setdefault(r["row"], {})
        merge_counts(row.setdefault(task, empty_counts()), counts)
        merge_counts(row.setdefault("all", empty_counts()), counts)
    return {row: {key: confusion_table(c) for key, c in by.items()} for row, by in sorted(per.items())}


def confusion_markdown(confusion: dict) -> str:
    """One line per (row, task) and per row over all tasks: shares (%) with the uniform-guess value."""
    lines = [
        "| Row | Task | n | correct | task-blind | wrong position | wrong category | other | trained pair | "
        "right answer's rank | right ranked last | wrong word's skill |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(t: dict, key: str) -> str:
        return f"{100 * t['shares'][key]:.1f} ({100 * t['chance'][key]:.1f})"

    for row, by in confusion.items():
        for task in sorted(by, key=lambda t: (t == "all", t)):
            t = by[task]
            if not t.get("n"):
                continue
            skills = ", ".join(
                f"{k.split(':')[1]} {100 * v:.0f}"
                for k, v in sorted(t["wrong_skill"].items(), key=lambda kv: -kv[1])[:3]
            )
            lines.append(
                f"| {row} | {'**all**' if task == 'all' else task} | {t['n']} | {pct(t, 'correct')} | "
                f"{100 * t['blind_correct']:.1f} | "
                f"{pct(t, 'wrong_position')} | {pct(t, 'wrong_category')} | {pct(t, 'other')} | "
                f"{100 * t['trained_pair']:.1f} ({100 * t['trained_pair_chance']:.1f}) | "
                f"{t['right_rank']:.2f} ({t['right_rank_chance']:.2f}) | "
                f"{100 * t['right_last']:.1f} ({100 * t['right_last_chance']:.1f}) | {skills} |"
            )
    return "\n".join(lines) + "\n"
