"""Mixture registry: which P3 configs form the training tasks and the held-out tasks.

A task is one (dataset, template) pair, exactly like a P3 config; its name is the P3
config name. The order of `Mixture.train` is the task-id order every later stage uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from .errors import ConfigError, unknown_name

T0_TASKS_RESOURCE = "t0_tasks.json"
DEFAULT_BUDGET = 500_000


@dataclass(frozen=True)
class TrainTemplate:
    task: str  # task name == source config name
    dataset: str  # "dataset/subset", used to count templates per dataset
    template: str
    n_templates: int  # templates of this dataset in the mixture (for the budget cap rule)


@dataclass(frozen=True)
class HeldOutTask:
    name: str
    templates: tuple[tuple[str, str], ...]  # (template name, config name)
    eval_split: str  # split name inside each config
    few_shot_split: str
    few_shot_k: int
    on_hub: bool  # False for StoryCloze: not part of bigscience/P3


@dataclass(frozen=True)
class Mixture:
    name: str
    train: tuple[TrainTemplate, ...]
    held_out: tuple[HeldOutTask, ...]
    description: str
    manifest_extra: dict = field(default_factory=dict, hash=False, compare=False)  # extra manifest keys

    def held_out_task(self, name: str) -> HeldOutTask:
        for t in self.held_out:
            if t.name == name:
                return t
        raise unknown_name("held-out task", name, [t.name for t in self.held_out])


@dataclass(frozen=True)
class CapRule:
    """Per-template training cap.

    budget:B -> min(size, B // n_templates) rows, taking train[0:cap] (the T-Few/mttl slice rule;
    B = 500000 by default). fixed N -> min(size, N). none -> all rows.
    """

    kind: str
    value: int = 0

    @classmethod
    def parse(cls, text: str | None) -> CapRule:
        if text is None:
            return cls("budget", DEFAULT_BUDGET)
        t = text.strip().lower()
        if t == "none":
            return cls("none", 0)
        if t.startswith("budget:"):
            t, kind = t[len("budget:") :], "budget"
        else:
            kind = "fixed"
        try:
            value = int(t)
        except ValueError:
            raise ConfigError(f"--cap-per-template expects N, budget:B or none, got {text!r}") from None
        if value <= 0:
            raise ConfigError(f"--cap-per-template must be positive, got {text!r}")
        return cls(kind, value)

    def cap(self, size: int, n_templates: int) -> int:
        if self.kind == "none":
            return size
        if self.kind == "budget":
            return min(size, self.value // n_templates)
        return min(size, self.value)

    def describe(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "budget":
            return f"min(size, {self.value} // n_templates), train[0:cap]"
        return f"min(size, {self.value}), train[0:cap]"


def _p3_split(hf_split: str) -> str:
    # P3 configs only have train/validation/test; ANLI's test_rX/dev_rX/train_rX live in the
    # per-round configs' test/validation/train splits.
    if hf_split.startswith("train"):
        return "train"
    if hf_split.startswith("dev") or hf_split == "validation":
        return "validation"
    if hf_split.startswith("test"):
        return "test"
    raise ValueError(f"unexpected split name {hf_split!r} in t0_tasks.json")


@cache
def load_t0_tasks() -> dict:
    text = resources.files("data_prep").joinpath("resources", T0_TASKS_RESOURCE).read_text("utf-8")
    return json.loads(text)


def _t0_mixture(name: str, original_only: bool) -> Mixture:
    spec = load_t0_tasks()
    train = []
    for ds in spec["train_mixture"]:
        key = ds["dataset"] + (f"/{ds['subset']}" if ds["subset"] else "")
        templates = [t for t in ds["templates"] if not t["blacklisted"]]
        if original_only:
            templates = [t for t in templates if t["original_task"]]
        for t in templates:
            train.append(TrainTemplate(t["p3_config"], key, t["template"], len(templates)))
    held = []
    for h in spec["held_out_eval"]:
        # The T0 evaluation set: original-task templates only (T0 paper, T-Few "all templates").
        temps = tuple((t["template"], t["p3_config"]) for t in h["templates"] if t["original_task"])
        held.append(
            HeldOutTask(
                name=h["task"],
                templates=temps,
                eval_split=_p3_split(h["eval_split"]),
                few_shot_split=_p3_split(h["few_shot_source_split"]),
                few_shot_k=int(h["few_shot_k"]),
                on_hub=all(t["in_p3"] for t in h["templates"] if t["original_task"]),
            )
        )
    desc = "T0 training mixture: every promptsource template of the 38 T0 datasets" + (
        " (original-task templates only)" if original_only else ""
    )
    return Mixture(name, tuple(train), tuple(held), desc)


def _embedded_mixture(name: str) -> Mixture:
    from . import embedded

    return embedded.mixture(name)


def _latent_skills_mixture(name: str) -> Mixture:
    from . import latent_skills

    return latent_skills.mixture(name)


_MIXTURES = {
    "t0_train": lambda: _t0_mixture("t0_train", original_only=False),
    "t0_train_og": lambda: _t0_mixture("t0_train_og", original_only=True),
    "embedded": lambda: _embedded_mixture("embedded"),
    "latent_skills": lambda: _latent_skills_mixture("latent_skills"),
    "latent_skills_noprompt": lambda: _latent_skills_mixture("latent_skills_noprompt"),
}


def mixture_names() -> list[str]:
    return list(_MIXTURES)


def get_mixture(name: str) -> Mixture:
    if name not in _MIXTURES:
        raise unknown_name("mixture", name, _MIXTURES)
    return _MIXTURES[name]()
