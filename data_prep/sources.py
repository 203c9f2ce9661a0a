"""Where P3-format records come from: the Hub, a local dump, or the embedded generator.

Every source answers `load(config, split) -> list[Chunk]` (one chunk per file, in file-name
order) so validation can name the exact file and row of a bad record.

Local dump layout (`--source local:PATH`), one folder per config:
    PATH/<config>/<split>.<ext>            e.g. PATH/super_glue_rte_GPT_3_style/validation.parquet
    PATH/<config>/<split>-<suffix>.<ext>   shards, read in sorted file-name order
with <split> in train/validation/test and <ext> one of parquet, jsonl (JSON Lines, also
.json), arrow (Arrow IPC stream as written by `datasets`, or IPC file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import embedded, latent_skills
from .errors import ConfigError, DataError
from .records import MISSING, Chunk

HUB_DATASET = "bigscience/P3"
EXTENSIONS = (".parquet", ".jsonl", ".json", ".arrow")
SOURCE_KINDS = ("hub", "embedded", "local:PATH")


def hub_load_dataset(path: str, name: str, split: str):
    """The one call that reaches the Hub; tests replace it (or datasets.load_dataset) with a stand-in."""
    import datasets
    return datasets.load_dataset(path, name, split=split)


def _columns_from_table(table: pa.Table) -> dict[str, list]:
    return table.to_pydict()


@dataclass
class HubSource:
    kind: str = "hub"

    def describe(self) -> str:
        return "hub"

    def check_configs(self, configs: list[str]) -> None:
        # The Hub listing is not reachable offline; missing configs surface in load().
        return None

    def load(self, config: str, split: str) -> list[Chunk]:
        ds = globals()["hub_load_dataset"](HUB_DATASET, config, split)
        table = ds.data.table if hasattr(ds, "data") and hasattr(ds.data, "table") else ds
        if isinstance(table, pa.Table):
            cols, n = _columns_from_table(table), table.num_rows
        else:   # a plain list of records from a stand-in
            cols, n = _columns_from_rows(list(table), f"hub:{HUB_DATASET}/{config}/{split}", config)
        return [Chunk(f"hub:{HUB_DATASET}/{config}/{split}", cols, n)]


def _columns_from_rows(rows: list, origin: str, config: str) -> tuple[dict[str, list], int]:
    names: list[str] = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError("wrong_type", origin, config, i, "<record>", f"expected an object, got {type(r).__name__}")
        for k in r:
            if k not in names:
                names.append(k)
    return {k: [r.get(k, MISSING) for r in rows] for k in names}, len(rows)


def _read_jsonl(path: Path, config: str) -> tuple[dict[str, list], int]:
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError("malformed_json", str(path), config, len(rows), "<line>", f"invalid JSON ({e.msg})") from None
    return _columns_from_rows(rows, str(path), config)


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as src:
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path), "r") as src:
        return pa.ipc.open_file(src).read_all()


@dataclass
class LocalSource:
    root: Path
    kind: str = "local"

    def describe(self) -> str:
        return f"local:{self.root}"

    def check_configs(self, configs: list[str]) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"local source {self.root} is not a directory")
        missing = [c for c in configs if not (self.root / c).is_dir()]
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} missing)" if len(missing) > 20 else "")
            raise ConfigError(f"local source {self.root} lacks config folders: {shown}")

    def split_files(self, config: str, split: str) -> list[Path]:
        folder = self.root / config
        files = sorted(p for p in folder.iterdir()
                       if p.suffix in EXTENSIONS and (p.stem == split or p.stem.startswith(split + "-")))
        formats = {".jsonl" if p.suffix == ".json" else p.suffix for p in files}
        if len(formats) > 1:
            raise ConfigError(f"{folder}: split {split!r} is stored in several formats: {[p.name for p in files]}")
        if not files:
            present = sorted(p.name for p in folder.iterdir())
            raise ConfigError(f"{folder}: no files for split {split!r} (expected {split}.parquet|jsonl|arrow "
                              f"or {split}-*.ext); found {present}")
        return files

    def load(self, config: str, split: str) -> list[Chunk]:
        chunks = []
        for path in self.split_files(config, split):
            if path.suffix == ".parquet":
                t = pq.read_table(path)
                cols, n = _columns_from_table(t), t.num_rows
            elif path.suffix == ".arrow":
                t = _read_arrow(path)
                cols, n = _columns_from_table(t), t.num_rows
            else:
                cols, n = _read_jsonl(path, config)
            chunks.append(Chunk(str(path), cols, n))
        return chunks


@dataclass
class EmbeddedSource:
    kind: str = "embedded"

    def describe(self) -> str:
        return "embedded"

    def check_configs(self, configs: list[str]) -> None:
        valid = set(embedded.config_names()) | set(latent_skills.config_names())
        missing = [c for c in configs if c not in valid]
        if missing:
            raise ConfigError(f"the embedded source only provides the generated mixtures (embedded, latent_skills*); "
                              f"it has no configs "
                              f"{missing[:10]}; valid configs: {sorted(valid)}")

    def load(self, config: str, split: str) -> list[Chunk]:
        generator = latent_skills if config in set(latent_skills.config_names()) else embedded
        rows = generator.records(config, split)
        cols, n = _columns_from_rows(rows, f"embedded:{config}/{split}", config)
        return [Chunk(f"embedded:{config}/{split}", cols, n)]


def parse_source(text: str):
    if text == "hub":
        return HubSource()
    if text == "embedded":
        return EmbeddedSource()
    if text.startswith("local:") and len(text) > len("local:"):
        return LocalSource(Path(text[len("local:"):]).expanduser().resolve())
    raise ConfigError(f"unknown source {text!r}; valid sources: {', '.join(SOURCE_KINDS)}")
