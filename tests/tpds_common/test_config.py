"""The one configuration machinery (tpds_common.config): typed sections, unknown keys, wrong types, overrides,
composition and the one message format every loader uses."""

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tpds_common.config import (
    apply_overrides,
    build,
    check_fields,
    load_files,
    parse_override,
    parse_value,
    reject_unknown,
)
from tpds_common.errors import ConfigError


@dataclass
class Train:
    steps: int = 10
    lr: float = 1e-3
    fast: bool = False
    name: str | None = None
    seeds: tuple[int, ...] = (0, 1)
    tags: list = field(default_factory=list)
    out: Path = Path("runs")


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_unknown_key_in_a_section_names_file_key_and_valid_keys():
    """Mutation seen caught: the unknown-key loop in `build` removed (the dataclass raised its own TypeError,
    naming neither file nor valid keys)."""
    with pytest.raises(ConfigError) as err:
        build(Train, {"steps": 3, "stepz": 4}, "train", {"train": "a.yaml"})
    assert str(err.value) == (
        "a.yaml: unknown key 'train.stepz'; valid keys in 'train': fast, lr, name, out, seeds, steps, tags"
    )


def test_unknown_keys_of_a_whole_file_are_all_named():
    """Mutation seen caught: `unknown_keys_message` listing only the first unknown key at the top level."""
    with pytest.raises(ConfigError) as err:
        reject_unknown({"a": 1, "zz": 2, "yy": 3}, ["a", "b"], "f.yaml")
    assert str(err.value) == "f.yaml: unknown key(s) ['yy', 'zz']; valid keys: a, b"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("steps", "ten", "expected an integer, got str"),
        ("steps", True, "expected an integer, got bool"),  # a bool is an int in Python, never in a config
        ("steps", 2.5, "expected an integer, got float"),
        ("lr", "fast", "expected a number, got str"),
        ("fast", "yes", "expected true/false, got str"),
        ("name", 3, "expected a string or null, got int"),
        ("seeds", [0, "one"], "expected an integer, got str"),
        ("tags", "a,b", "expected a list, got str"),
    ],
)
def test_wrong_types_are_refused_in_the_one_format(key, value, expected):
    """Mutations seen caught: `isinstance(value, bool)` dropped from the int check (True passed as 1), the
    element check of tuple[int, ...] removed (['0', 'one'] accepted)."""
    with pytest.raises(ConfigError) as err:
        build(Train, {key: value}, "train", {"train": "a.yaml"})
    dotted = "train.seeds[1]" if key == "seeds" else f"train.{key}"
    shown = "'one'" if key == "seeds" else repr(value)
    assert str(err.value) == f"a.yaml: key '{dotted}' = {shown}: {expected}"


def test_values_are_converted_only_where_exact():
    """An int or a numeric string is a float where a float is expected, a list a tuple, a string a Path.
    Mutation seen caught: `return float(value)` -> `return value` (lr stayed the int 1)."""
    t = build(Train, {"lr": 1, "seeds": [3, 4], "out": "x/y", "name": None}, "train", {})
    assert (t.lr, type(t.lr), t.seeds, t.out, t.name) == (1.0, float, (3, 4), Path("x/y"), None)
    assert build(Train, {"lr": "3e-3"}, "train", {}).lr == pytest.approx(3e-3)


def test_a_nested_key_is_named_by_the_file_that_set_it(tmp_path):
    """Files merge key by key; an error in a key names the file that set that key last, not the file that
    created its section. Mutations seen caught: deep_merge not recording the origin of a replaced nested key
    (the error named a.yaml), build naming the section's origin for every value (a.yaml)."""
    a = _write(tmp_path / "a.yaml", {"train": {"steps": 5, "lr": 0.1}})
    b = _write(tmp_path / "b.yaml", {"train": {"steps": "many"}, "other": {"x": 1}})
    sources: dict = {}
    data = load_files([a, b], sources)
    assert data == {"train": {"steps": "many", "lr": 0.1}, "other": {"x": 1}}
    assert (sources["train.lr"], sources["train.steps"], sources["other.x"]) == (str(a), str(b), str(b))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(b))}: key 'train.steps' = 'many': expected an integer"):
        build(Train, data["train"], "train", sources)


@pytest.mark.parametrize(
    "raw, value",
    [
        ("1e-3", 1e-3),
        ("2E+5", 2e5),
        ("-1e-3", -1e-3),
        ("3.0e-3", 3e-3),
        ("1", 1),
        ("0.5", 0.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ("yes", "yes"),
        ("on", "on"),
        ("2024-01-02", "2024-01-02"),
        ("[1, 2.5, x]", [1, 2.5, "x"]),
        ('{"rank": 2, "skills": 4}', {"rank": 2, "skills": 4}),
        ('"engine"', "engine"),
        ("Poly x", "Poly x"),
        ("", ""),
        ("[unclosed", "[unclosed"),
    ],
)
def test_override_values_are_yaml_with_the_1_1_pitfalls_fixed(raw, value):
    """YAML (JSON included) with 1e-3 a float, only true/false booleans, dates kept as written; text that is
    not YAML stays a string. Mutation seen caught: parse_value with yaml.safe_load (1e-3 stayed the string
    '1e-3', yes/on became True, the date a datetime.date)."""
    parsed = parse_value(raw)
    assert parsed == value and type(parsed) is type(value)


def test_dotted_overrides_create_sections_and_name_themselves():
    """Mutation seen caught: apply_override without the "is not a section" check (a scalar was indexed:
    TypeError instead of a named error)."""
    data = {"train": {"steps": 1}}
    sources: dict = {}
    apply_overrides(data, ["train.steps=5", "optim.lr=1e-3", "train.tags=[a, b]"], sources)
    assert data == {"train": {"steps": 5, "tags": ["a", "b"]}, "optim": {"lr": 1e-3}}
    assert sources["optim.lr"] == "override 'optim.lr=1e-3'"
    with pytest.raises(ConfigError, match=r"--set 'train.steps.x=1': train.steps.x: 'steps' is not a section"):
        apply_overrides(data, ["train.steps.x=1"], sources, label="--set")
    with pytest.raises(ConfigError, match=r"override 'steps': expected key=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match=r"bad key 'train\.'"):
        parse_override("train.=3")


def test_a_file_includes_others_and_wins_over_them(tmp_path):
    """`include:` (paths relative to the including file) merges those files first, the file itself on top; an
    error names the file that set the key; a cycle is refused. Mutations seen caught: the includes merged on
    top of the file (steps came out 1, not 2), the cycle check removed (RecursionError)."""
    (tmp_path / "sub").mkdir()
    base = _write(tmp_path / "sub" / "base.yaml", {"train": {"steps": 1, "lr": 0.5, "name": 7}})
    top = _write(tmp_path / "top.yaml", {"include": "sub/base.yaml", "train": {"steps": 2}})
    sources: dict = {}
    data = load_files([top], sources)
    assert data == {"train": {"steps": 2, "lr": 0.5, "name": 7}}
    assert sources["train.steps"] == str(top)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))}: key 'train.name' = 7: expected a string"):
        build(Train, data["train"], "train", sources)
    _write(tmp_path / "sub" / "base.yaml", {"include": ["../top.yaml"]})
    with pytest.raises(ConfigError, match="include forms a cycle"):
        load_files([top], {})
    _write(top, {"include": {"a": 1}})
    with pytest.raises(ConfigError, match="key 'include' = {'a': 1}: expected a file name"):
        load_files([top], {})


def test_records_are_checked_field_by_field():
    """check_fields (adaptation jobs, grid bases): every unknown field at once, then types.
    Mutation seen caught: check_fields returning `dict(data)` unchecked (lr '0.1x' passed)."""
    with pytest.raises(ConfigError, match=r"^job: unknown job field\(s\) \['stepz'\]; valid job fields: fast, lr"):
        check_fields(Train, {"stepz": 1}, "job", what="job field")
    with pytest.raises(ConfigError, match=r"^job: key 'lr' = '0.1x': expected a number, got str$"):
        check_fields(Train, {"lr": "0.1x"}, "job")
    assert check_fields(Train, {"lr": 1, "seeds": [1]}, "job") == {"lr": 1.0, "seeds": (1,)}


# --- the one message format, through every front-end -----------------------------------------------------------
TYPE_MESSAGE = r"^(?P<where>.+): key '(?P<key>[\w.\[\]]+)' = (?P<value>.+): expected (?P<what>.+), got (?P<got>\w+)$"


def _run_config(tmp_path):
    from tensorpoly_ds.engine.config import load_run_config

    load_run_config([_write(tmp_path / "run.yaml", {"train": {"steps": "many"}})])


def _adapt_set(tmp_path):
    from launch.adapt import build_parser, resolve_job

    resolve_job(
        build_parser().parse_args(
            ["--method", "lora", "--task", "t", "--data", "d", "--out", "o", "--set", "steps=many"]
        )
    )


def _replicate(tmp_path):
    from tensorpoly_ds.replicate.config import load_config

    load_config(
        _write(
            tmp_path / "r.yaml",
            {
                "variants": [{"name": "np", "mixture": "latent_skills_noprompt"}],
                "methods": [{"label": "L", "adapter": {"method": "lora"}}],
                "adapt": {"steps": "many"},
            },
        )
    )


def _grid(tmp_path):
    from tensorpoly_ds.adapt.table import expand_grid

    expand_grid(
        {"base": {"steps": "many", "data_dir": "d"}, "methods": [{"label": "F", "method": "fullft"}], "tasks": ["t"]},
        tmp_path,
        source="grid.yaml",
    )


def _prep(tmp_path):
    from data_prep.pipeline import load_prep_config

    load_prep_config(
        [
            _write(
                tmp_path / "prep.yaml",
                {
                    "mixture": "embedded",
                    "source": "embedded",
                    "tokenizer": "embedded",
                    "out": "d",
                    "num_shards": "many",
                },
            )
        ]
    )


@pytest.mark.parametrize(
    "front",
    [_run_config, _adapt_set, _replicate, _grid, _prep],
    ids=["run config", "adapt --set", "replicate", "sweep grid", "prep config"],
)
def test_every_front_end_reports_a_wrong_type_in_the_one_format(tmp_path, front):
    """Run configs, adaptation jobs (--set), replicate configs, sweep grids and prep configs all say
    `<where>: key '<key>' = <value>: expected <what>, got <type>`, with a ConfigError-compatible ValueError.
    Mutation seen caught: AdaptJob.from_dict back to `cls(**data)` without check_fields (no error at all:
    steps='many' was accepted until training)."""
    with pytest.raises(ValueError) as err:
        front(tmp_path)
    m = re.match(TYPE_MESSAGE, str(err.value))
    assert m, str(err.value)
    assert m["key"].split(".")[-1] in ("steps", "num_shards") and m["value"] == "'many'" and m["got"] == "str"
