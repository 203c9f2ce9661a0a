"""The configuration code may be reorganised, but nothing a shipped config derives may change.

tests/configs/fixtures/derived_values.json was written by the code on main before the config refactor of
issue #17 (`python -m tests.configs.derived_values --write`): the replicate protocols (a published OUT resumes
only if its protocol.json is unchanged), digests and cache keys, every pretraining run config and adaptation
job row the replicate stages generate, the sweep grids' job tables, the prep arguments, the claims, the
pretraining run configs and the jobs `tensorpoly-ds adapt --set` resolves.
"""

import json

from tests.configs.derived_values import FIXTURE, derived_values


def _differences(old, new, path="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new), key=str)
            for d in (_differences(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{path}.{k}"))
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new and type(old) is type(new) else [f"{path}: {old!r} -> {new!r}"]


def test_every_derived_value_is_unchanged():
    """Mutations seen caught (each by monkeypatching the code, then this comparison): the clip of
    PRETRAIN_RUN_CONFIG as Fixed(1) instead of Fixed(1.0) (273 differences, e.g. `...pretrain_runs...optim.clip:
    1.0 -> 1` and the run.yaml digest), float fields no longer converted from ints by the machinery
    (`.run_configs.base_t0_3b.yaml.config.train.max_minutes: 0.0 -> 0`), protocol() keeping `workers`
    (`.replicate.ci.yaml.protocol.workers: '<missing>' -> 2`)."""
    expected = json.loads(FIXTURE.read_text())
    found = derived_values()
    diffs = _differences(expected, found)
    assert not diffs, f"{len(diffs)} derived values changed, e.g.:\n" + "\n".join(diffs[:20])
