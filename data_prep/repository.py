"""The layouts of the bigscience/P3 repository, on the Hub or as a downloaded snapshot.

Two layouts coexist in its history (see docs/prep.md, "bigscience/P3 on the Hub"):
- Parquet: `<config>/<split>-NNNNN-of-NNNNN.parquet`, declared in the README's YAML front matter
  (`configs: [{config_name, data_files: [{split, path: <glob>}]}]`, with `dataset_info`).
- TFRecord (the original upload): `data/<config>/<split>.tfrecord-NNNNN-of-NNNNN` plus the seqio
  feature spec `data/<config>/info.<split>.json`.
A config is read from the Parquet layout when the README declares it, else from the TFRecord
layout when its files are there; `resolve` returns None when neither has the split.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import PurePosixPath

import yaml

from tpds_common.errors import DataError

from .readers import DATA_KINDS_BY_EXT, SplitFiles

README = "README.md"
TFRECORD_ROOT = "data"


def front_matter(text: str | None) -> dict:
    """The YAML metadata block at the top of a dataset card ({} if there is none)."""
    if not text or not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError as e:
        raise DataError(f"{README}: invalid YAML front matter ({e})") from None
    return meta if isinstance(meta, dict) else {}


def declared_configs(meta: dict) -> dict[str, dict[str, list[str]]]:
    """{config_name: {split: [path globs]}} from the card's `configs` list. A bare string or list
    of data files means one split, "train" (the `datasets` convention)."""
    out: dict[str, dict[str, list[str]]] = {}
    for entry in meta.get("configs") or []:
        if not isinstance(entry, dict) or "config_name" not in entry:
            continue
        files = entry.get("data_files")
        splits: dict[str, list[str]] = {}
        if isinstance(files, (str, list)) and not (isinstance(files, list) and files and isinstance(files[0], dict)):
            splits["train"] = [files] if isinstance(files, str) else list(files)
        else:
            for item in files or []:
                paths = item.get("path")
                splits[str(item.get("split", "train"))] = [paths] if isinstance(paths, str) else list(paths or [])
        out[str(entry["config_name"])] = splits
    return out


@lru_cache(maxsize=4096)
def _glob_regex(pattern: str) -> re.Pattern:
    # `*` and `?` stay inside one path segment, `**` crosses segments (as in `datasets` data_files).
    rx = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace(r"\?", "[^/]").replace("\0", ".*")
    return re.compile(rx + r"\Z")


def match(patterns: list[str], files: list[str]) -> list[str]:
    rxs = [_glob_regex(p.lstrip("./")) for p in patterns]
    return sorted(f for f in files if any(r.match(f) for r in rxs))


class Repository:
    """Config resolution over a file listing (repository-relative POSIX paths) and the card text."""

    def __init__(self, files: list[str], readme: str | None):
        self.files = files
        self.configs = declared_configs(front_matter(readme))
        self._tf: dict[str, list[str]] | None = None

    def _tfrecords(self) -> dict[str, list[str]]:
        if self._tf is None:
            self._tf = {}
            for f in self.files:
                parts = PurePosixPath(f).parts
                if len(parts) == 3 and parts[0] == TFRECORD_ROOT and ".tfrecord-" in parts[2]:
                    self._tf.setdefault(parts[1], []).append(f)
        return self._tf

    def has_layout(self) -> bool:
        return bool(self.configs) or bool(self._tfrecords())

    def resolve(self, config: str, split: str) -> SplitFiles | None:
        declared = self.configs.get(config)
        if declared is not None and split in declared:
            files = match(declared[split], self.files)
            kinds = {DATA_KINDS_BY_EXT.get(PurePosixPath(f).suffix) for f in files}
            if files and len(kinds) == 1 and None not in kinds:
                return SplitFiles(config, split, kinds.pop(), tuple(files))
        shards = sorted(
            f for f in self._tfrecords().get(config, []) if PurePosixPath(f).name.startswith(f"{split}.tfrecord-")
        )
        if shards:
            return SplitFiles(
                config, split, "tfrecord", tuple(shards), info=f"{TFRECORD_ROOT}/{config}/info.{split}.json"
            )
        return None

    def describe_config(self, config: str) -> str:
        """What the repository has for a config, for error messages."""
        bits = []
        if config in self.configs:
            bits.append(f"declared in {README} with splits {sorted(self.configs[config])}")
        tf = self._tfrecords().get(config)
        if tf:
            bits.append(f"TFRecord files {[PurePosixPath(f).name for f in tf][:4]}")
        return "; ".join(bits) or "neither declared in the card's `configs` nor present under data/<config>/"
