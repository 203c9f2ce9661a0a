"""The one configuration machinery: YAML files and dicts into typed dataclasses, dotted overrides, composition.

Every configuration of the project goes through here: run configs (tensorpoly_ds.engine.config), adaptation
jobs and their `--set key=value` (tensorpoly_ds.adapt.spec), sweep grids (tensorpoly_ds.adapt.table), the
replicate config (tensorpoly_ds.replicate.config), claims files (tensorpoly_ds.analysis.claims) and prep
configs (data_prep.pipeline.PrepConfig).

    sources = {}
    data = load_files(["base.yaml", "lora.yaml"], sources)        # later files win, mappings merge key by key
    for text in ["train.steps=200", "optim.lr=1e-3"]:
        apply_override(data, *parse_override(text), sources, f"override {text!r}")
    section = build(TrainSection, data["train"], "train", sources)  # unknown keys and wrong types refused

One message format, for every loader (docs/development.md, "Configuration"):
    <where>: key '<section.key>' = <value>: expected <what>, got <type>          (wrong type or value)
    <where>: unknown key '<section.key>'; valid keys in '<section>': <a, b, c>    (a key inside a section)
    <where>: unknown key(s) ['<k>', ...]; valid keys: <a, b, c>                 (keys of a whole file / entry)
where <where> is the file (or `override 'k=v'`, `command line`) that set the key, plus the list entry if any.

Values are YAML scalars read with YAML 1.2's rules where YAML 1.1 surprises: `1e-3` is a float (1.1 reads a
string), only true/false are booleans (1.1 also reads yes/no/on/off), and dates stay strings. JSON values are valid YAML, so
`key=<JSON>` keeps working. This module imports pyyaml and nothing of the project above tpds_common.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

INCLUDE = "include"  # a file's list of files (relative to it) merged under it: composition
# Field metadata of a config field added after results were published with its dataclass: at its default it is
# left out of stable_asdict, so digests, protocol files and job records made before it stay the same bytes.
ADDED_LATER = "added_later"


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (1e-3) and booleans (true/false only), and no timestamps (a date stays
    the string it was written as)."""


_BOOL, _FLOAT, _TIMESTAMP = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# after int and 1.1's float: only what they miss, a mantissa without a dot (1e-3, 2E+5)
Loader.add_implicit_resolver(_FLOAT, re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_value(raw: str) -> Any:
    """One scalar or flow value as YAML (JSON included); text that is not valid YAML stays a string."""
    if not raw.strip():
        return ""
    try:
        return yaml.load(raw, Loader=Loader)  # a SafeLoader subclass: no object construction
    except yaml.YAMLError:
        return raw


def read_yaml(path: str | os.PathLike, error: type[Exception] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping (an empty file is {}); errors name the file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=Loader)
    except FileNotFoundError:
        raise error(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


# ---- composition --------------------------------------------------------------------------------------------
def deep_merge(base: dict, update: dict, sources: dict, origin: str, prefix: str = "") -> dict:
    """Merge `update` into a copy of `base` (mappings key by key, anything else replaced); record in `sources`
    which origin set each dotted key."""
    out = dict(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, sources, origin, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            sources[dotted] = origin
            if isinstance(value, dict):
                for sub in dotted_keys(value, dotted + "."):
                    sources[sub] = origin
    return out


def dotted_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + str(k))
        if isinstance(v, dict):
            keys.extend(dotted_keys(v, prefix + str(k) + "."))
    return keys


def load_file(
    path: str | os.PathLike, sources: dict, error: type[Exception] = ConfigError, _seen: tuple[Path, ...] = ()
) -> dict:
    """A file with its `include:` list (paths relative to it) merged first, the file itself on top."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise error(f"{path}: {INCLUDE} forms a cycle ({chain})")
    data = read_yaml(path, error)
    includes = data.pop(INCLUDE, None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(p, str) for p in includes):
        raise error(f"{path}: key '{INCLUDE}' = {includes!r}: expected a file name or a list of file names")
    merged: dict = {}
    for name in includes:
        child = Path(name) if os.path.isabs(name) else path.parent / name
        merged = _merge_file(merged, child, sources, error, (*_seen, path.resolve()))
    return deep_merge(merged, data, sources, str(path))


def load_files(paths: Iterable[str | os.PathLike], sources: dict, error: type[Exception] = ConfigError) -> dict:
    """Files merged in order (later wins), each with its includes; `sources` names the file of every key."""
    data: dict = {}
    for path in paths:
        data = _merge_file(data, Path(path), sources, error, ())
    return data


def _merge_file(data: dict, path: Path, sources: dict, error, seen: tuple[Path, ...]) -> dict:
    own: dict = {}
    merged = deep_merge(data, load_file(path, own, error, seen), sources, str(path))
    sources.update(own)  # a key an included file set is named by that file
    return merged


# ---- overrides -------------------------------------------------------------------------------------------------
def parse_override(text: str, error: type[Exception] = ConfigError) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed by parse_value)."""
    if "=" not in text:
        raise error(f"override {text!r}: expected key=value (e.g. train.steps=200)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise error(f"override {text!r}: bad key {key!r}")
    return key.split("."), parse_value(raw)


def apply_override(
    data: dict, parts: list[str], value: Any, sources: dict, origin: str, error: type[Exception] = ConfigError
) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise error(f"{origin}: {'.'.join(parts)}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    sources[".".join(parts)] = origin


def apply_overrides(
    data: dict, overrides: Iterable[str], sources: dict, error: type[Exception] = ConfigError, label: str = "override"
) -> dict:
    """Every `key=value` of `overrides` applied to `data` in order; each is named `<label> 'k=v'` in errors
    (label: the option that gave it, e.g. --set)."""
    for text in overrides:
        parts, value = parse_override(text, error)
        apply_override(data, parts, value, sources, f"{label} {text!r}", error)
    return data


# ---- checking ---------------------------------------------------------------------------------------------------
def unknown_keys_message(
    where: str, unknown: Iterable[str], valid: Iterable[str], section: str = "", what: str = "key"
) -> str:
    """The one unknown-key message: inside a section the first unknown key with its dotted path; at the top
    level of a file or list entry every unknown key. Both end with the valid keys."""
    unknown, valid = sorted(unknown), ", ".join(sorted(valid))
    if section:
        return f"{where}: unknown {what} '{section}.{unknown[0]}'; valid {what}s in '{section}': {valid}"
    return f"{where}: unknown {what}(s) {unknown}; valid {what}s: {valid}"


def reject_unknown(
    data: Mapping,
    valid: Iterable[str],
    where: str,
    error: type[Exception] = ConfigError,
    what: str = "key",
    section: str = "",
) -> None:
    """Raise `error` naming the keys of `data` that are not `valid` (a typo must not be silently ignored)."""
    valid = set(valid)
    unknown = set(data) - valid
    if unknown:
        raise error(unknown_keys_message(where, unknown, valid, section, what))


def type_message(where: str, key: str, value: Any, expected: str) -> str:
    """The one wrong-value message."""
    return f"{where}: key '{key}' = {value!r}: expected {expected}, got {type(value).__name__}"


def type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return {
        type(None): "null",
        float: "a number",
        int: "an integer",
        bool: "true/false",
        str: "a string",
        Path: "a path",
    }.get(tp, f"a {getattr(typing.get_origin(tp) or tp, '__name__', tp)}")


def check_value(value: Any, tp, key: str, where: str, error: type[Exception] = ConfigError) -> Any:
    """`value` checked against the annotation `tp` (None, bool, int, float, str, Path, list/tuple[...], dict,
    unions of these); returns it converted where that is exact (an int or numeric string for a float, a list for
    a tuple, a string for a Path). Anything else raises `error` in the one message format."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return check_value(value, arg, key, where, error)
                except error:
                    continue
        raise error(type_message(where, key, value, type_name(tp)))
    if tp is Any:
        return copy.deepcopy(value)
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 files and quoted numbers: a researcher means the number
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(type_message(where, key, value, "a number"))
        return float(value)
    if tp in (int, bool, str):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise error(type_message(where, key, value, type_name(tp)))
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise error(type_message(where, key, value, "a path"))
        return Path(value)
    if tp in (dict, list) or origin is dict:
        kind = origin or tp
        if not isinstance(value, kind):
            raise error(type_message(where, key, value, f"a {kind.__name__}"))
        return copy.deepcopy(value)
    if origin in (list, tuple):
        return _check_items(value, tp, origin, key, where, error)
    raise error(f"{where}: key '{key}': unsupported type {tp}")  # pragma: no cover


def _check_items(value: Any, tp, origin, key: str, where: str, error) -> Any:
    if not isinstance(value, (list, tuple)):
        raise error(type_message(where, key, value, f"a list of {type_name(typing.get_args(tp)[0])}"))
    item = typing.get_args(tp)[0]
    items = [check_value(v, item, f"{key}[{i}]", where, error) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def build(
    cls,
    data: Any,
    section: str,
    sources: Mapping[str, str],
    error: type[Exception] = ConfigError,
    where: str | None = None,
):
    """The dataclass `cls` from the mapping `data` (section `section` of a config): unknown keys and wrong
    types refused, each error naming the origin (`sources[dotted key]`, else `where`, else the section's
    origin) in the one format; missing fields without a default are refused too."""
    origin = where or sources.get(section, "defaults")
    if not isinstance(data, dict):
        raise error(f"{origin}: section '{section}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in sorted(data, key=str):
        if key not in fields:
            raise error(unknown_keys_message(sources.get(f"{section}.{key}", origin), [key], fields, section))
    missing = [
        n
        for n, f in fields.items()
        if n not in data and f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise error(f"{origin}: section '{section}' misses key(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        k: check_value(v, hints[k], f"{section}.{k}", sources.get(f"{section}.{k}", origin), error)
        for k, v in data.items()
    }
    return cls(**kwargs)


def check_fields(
    cls,
    data: Mapping,
    where: str,
    error: type[Exception] = ConfigError,
    what: str = "key",
    sources: Mapping[str, str] | None = None,
) -> dict:
    """`data` as keyword arguments of the dataclass `cls` (a flat record such as an adaptation job): unknown
    keys refused in the top-level form, every value checked and converted (its error naming `sources[key]`
    where given, else `where`); the caller builds the object."""
    fields = {f.name for f in dataclasses.fields(cls)}
    reject_unknown(data, fields, where, error, what)
    hints = typing.get_type_hints(cls)
    sources = sources or {}
    return {k: check_value(v, hints[k], k, sources.get(k, where), error) for k, v in data.items()}


def stable_asdict(obj: Any) -> dict:
    """dataclasses.asdict without the fields marked ADDED_LATER that sit at their default."""
    body = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get(ADDED_LATER) and body[f.name] == (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        ):
            body.pop(f.name)
    return body
