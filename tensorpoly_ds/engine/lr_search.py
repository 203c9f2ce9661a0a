"""Learning-rate selection for multi-task pretraining: one short run per candidate, chosen on validation loss.

    tensorpoly-ds lr-search --config RUN.yaml --module-lrs 3e-4,1e-3,3e-3,1e-2,3e-2 \
        --routing-lrs 0.01,0.1,1 --steps 300 --out runs/lr_search/poly

The rule (fixed before any number is read, the same for every method):
1. Every candidate is a normal pretraining run (the run config with the candidate's learning rates and
   `steps` steps) in OUT/runs/<candidate>/; it is resumable like any run, and a finished one is never rerun.
2. Its score is the **final multi-task validation loss** per token (the last `val/loss` of its metrics.jsonl,
   written at its last step); a run that diverged (non-finite loss) scores +inf.
3. The module lr (`optim.module_lr`; `optim.lr` for a full fine-tune) is chosen first, with the routing lr at
   the run config's value; then, for methods with learned routing and a routing grid, the routing lr at the
   chosen module lr. Lowest loss wins; ties go to the smaller lr.
4. Edge rule: a choice at the smallest or largest value of its grid extends the grid by one step beyond that
   edge (the ratio of the two values nearest the edge) and the rule runs again, at most `max_extensions`
   times per axis. A choice still at an edge after that is reported as such (`edge`), never hidden.

OUT/lr_search.json holds every candidate's loss, the grids as run (extensions included) and the choice; it is
written after each axis (atomically), so a rerun after a stop reuses every finished candidate.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tpds_common.errors import ConfigError
from tpds_common.log import get_logger

RESULT_FILE = "lr_search.json"


class LrSearchError(ConfigError):
    """A learning-rate search is misconfigured or a candidate's result is unreadable; the message names it."""


@dataclass
class LrSearchSection:
    module_lrs: list = field(default_factory=list)  # candidates for optim.module_lr (optim.lr for a full FT)
    routing_lrs: list = field(default_factory=list)  # candidates for optim.routing_lr ([]: keep the run's)
    steps: int | None = None  # steps of each candidate run (None: the run's train.steps)
    max_extensions: int = 2  # edge-rule extensions per axis

    def validate(self, where: str) -> None:
        for name in ("module_lrs", "routing_lrs"):
            values = getattr(self, name)
            if not isinstance(values, list) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values
            ):
                raise LrSearchError(f"{where}: {name} = {values!r}: a list of positive numbers")
            if len(set(values)) != len(values):
                raise LrSearchError(f"{where}: {name} = {values!r}: duplicate values")
            setattr(self, name, sorted(float(v) for v in values))
        if not self.module_lrs:
            raise LrSearchError(f"{where}: module_lrs is empty: give at least one candidate")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise LrSearchError(f"{where}: steps = {self.steps!r}: an integer >= 1 (or null for the run's)")
        if not isinstance(self.max_extensions, int) or self.max_extensions < 0:
            raise LrSearchError(f"{where}: max_extensions = {self.max_extensions!r}: an integer >= 0")


@dataclass(frozen=True)
class Candidate:
    """One candidate run: the run config with these learning rates, in its own run directory."""

    lrs: tuple  # ((optim key, value), ...), e.g. (("module_lr", 1e-3), ("routing_lr", 0.1))
    run_dir: Path
    config: dict

    @property
    def name(self) -> str:
        return candidate_tag(dict(self.lrs))

    def done(self) -> bool:
        return final_val_loss(self.run_dir, missing_ok=True) is not None and (self.run_dir / "export").is_dir()


def candidate_tag(lrs: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sorted(lrs.items()))


def candidate(base: dict, lrs: dict[str, float], steps: int | None, runs_dir: Path) -> Candidate:
    """The run config of one candidate: `base` with `lrs` under optim, `steps` steps and its own run.dir."""
    config = copy.deepcopy(base)
    config.setdefault("optim", {}).update(lrs)
    if steps is not None:
        config.setdefault("train", {})["steps"] = steps
    run_dir = runs_dir / candidate_tag(lrs).replace(",", "_")
    config.setdefault("run", {})["dir"] = str(run_dir)
    return Candidate(tuple(sorted(lrs.items())), run_dir, config)


def final_val_loss(run_dir: Path, missing_ok: bool = False) -> float | None:
    """The last `val/loss` in RUN_DIR/metrics.jsonl (+inf if it is not finite). None when the run has not
    evaluated yet (missing_ok), else an error naming the file."""
    path = Path(run_dir) / "metrics.jsonl"
    loss = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a stop; the run rewrites its metrics on resume
            if "val/loss" in rec:
                loss = rec["val/loss"]
    if loss is None:
        if missing_ok:
            return None
        raise LrSearchError(
            f"{path}: no 'val/loss' record: the candidate run did not evaluate (does its data "
            "directory have a val split?)"
        )
    loss = float(loss)
    return loss if math.isfinite(loss) else math.inf


def select(losses: dict[float, float]) -> float:
    """The lr with the lowest loss; ties go to the smaller lr."""
    return min(sorted(losses), key=lambda lr: losses[lr])


def edge_of(choice: float, values: list[float]) -> str | None:
    """'low' / 'high' when `choice` is the smallest / largest of `values` (a grid of at least two values)."""
    if len(values) < 2:
        return None
    if choice == min(values):
        return "low"
    if choice == max(values):
        return "high"
    return None


def beyond(values: list[float], edge: str) -> float:
    """The next grid value past `edge`: one more step of the ratio between the two values nearest it."""
    v = sorted(values)
    new = v[0] * v[0] / v[1] if edge == "low" else v[-1] * v[-1] / v[-2]
    return float(f"{new:.3g}")


@dataclass
class AxisResult:
    key: str
    grid: list  # the grid as configured
    losses: dict  # every value run (extensions included) -> final val loss
    chosen: float
    extended: list  # values added by the edge rule, in order
    edge: str | None  # the edge the final choice still sits on (None: interior)

    def to_dict(self) -> dict:
        body = asdict(self)
        body["losses"] = {f"{k:g}": (v if math.isfinite(v) else None) for k, v in sorted(self.losses.items())}
        return body


def search_axis(
    key: str, grid: list[float], evaluate: Callable[[list[float]], dict[float, float]], max_extensions: int
) -> AxisResult:
    """Run `evaluate` on the grid, choose, and extend past an edge while the choice sits on it."""
    losses = dict(evaluate(sorted(grid)))
    extended: list[float] = []
    while True:
        chosen = select(losses)
        edge = edge_of(chosen, list(losses))
        if edge is None or len(extended) >= max_extensions:
            return AxisResult(key, sorted(grid), losses, chosen, extended, edge)
        new = beyond(list(losses), edge)
        extended.append(new)
        losses.update(evaluate([new]))


def routed_learned(config: dict) -> bool:
    adapter = config.get("adapter") or {}
    from ..adapters import AdapterConfig

    return (
        bool(adapter)
        and AdapterConfig.from_dict(dict(adapter)).routed
        and adapter.get("routing", "learned") == "learned"
    )


def search(
    base: dict, spec: LrSearchSection, out: Path, train: Callable[[list[Candidate]], None], label: str | None = None
) -> dict:
    """The whole search for one run config `base` (a dict as in a run YAML); `train(candidates)` trains the
    given unfinished candidate runs (in any order, possibly in parallel); `label` names the search in its log
    lines (`[lr-search LABEL]`). Returns (and writes) the result."""
    from tpds_common.files import atomic_write_json

    log = get_logger(f"lr-search {label}" if label else "lr-search")

    out = Path(out)
    module_key = "module_lr" if base.get("adapter") else "lr"
    optim = base.get("optim") or {}
    fixed: dict[str, float] = {}
    if routed_learned(base):
        fixed["routing_lr"] = float(optim.get("routing_lr", 0.1))
    candidates: dict[str, Candidate] = {}

    def evaluate(key: str, values: list[float]) -> dict[float, float]:
        cands = [candidate(base, {**fixed, key: v}, spec.steps, out / "runs") for v in values]
        todo = [c for c in cands if not c.done()]
        log.info(
            f"{key}: {len(cands)} candidates ({len(cands) - len(todo)} done): " + ", ".join(f"{v:g}" for v in values)
        )
        if todo:
            train(todo)
        candidates.update({c.name: c for c in cands})
        return {v: final_val_loss(c.run_dir) for v, c in zip(values, cands)}

    axes = []
    for key, grid in ((module_key, spec.module_lrs), ("routing_lr", spec.routing_lrs)):
        if not grid or (key == "routing_lr" and "routing_lr" not in fixed):
            continue
        axis = search_axis(key, grid, lambda values, key=key: evaluate(key, values), spec.max_extensions)
        fixed[key] = axis.chosen
        axes.append(axis)
        log.info(
            f"{key}: chose {axis.chosen:g}"
            + (f" (extended {axis.extended})" if axis.extended else "")
            + (f", still at the {axis.edge} edge" if axis.edge else "")
        )
        result = {
            "rule": "lowest final multi-task val/loss; module lr first, then routing lr; ties: smaller lr; "
            f"edge rule: up to {spec.max_extensions} extensions per axis",
            "spec": asdict(spec),
            "chosen": dict(fixed),
            "axes": [a.to_dict() for a in axes],
            "chosen_run": str(candidate(base, fixed, spec.steps, out / "runs").run_dir),
            "candidates": {
                name: {"run_dir": str(c.run_dir), "val_loss": _finite(final_val_loss(c.run_dir))}
                for name, c in sorted(candidates.items())
            },
        }
        atomic_write_json(out / RESULT_FILE, result)
    return result


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def read_result(out: Path) -> dict | None:
    path = Path(out) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
