"""Write a local replica of the bigscience/P3 repository (both layouts), for tests and benchmarks.

What the replica reproduces (docs/prep.md, "bigscience/P3 on the Hub"):
- the card README.md with YAML front matter: `dataset_info` (features, splits, num_examples) and
  `configs` (`data_files: [{split, path: <config>/<split>-*}]`) for the Parquet configs;
- Parquet files `<config>/<split>-00000-of-00001.parquet` with P3's columns;
- the original layout `data/<config>/<split>.tfrecord-00000-of-00001` (tf.train.Example records,
  int32 features stored as int64 lists), `info.<split>.json` (seqio feature spec),
  `stats.<split>.json` and `COMPLETED`;
- the loading script P3.py at the root, which makes `datasets` >= 4 refuse the repository as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from . import tfrecord

SCRIPT_STUB = '"""P3 (Public Pool of Prompts): the original loading script (stub in this replica)."""\n'


def _features(rows: list[dict]) -> dict[str, dict]:
    spec = {
        "inputs": {"dtype": "int32", "shape": [None]},
        "inputs_pretokenized": {"dtype": "string", "shape": []},
        "targets": {"dtype": "int32", "shape": [None]},
        "targets_pretokenized": {"dtype": "string", "shape": []},
    }
    if any("answer_choices" in r for r in rows):
        spec["answer_choices"] = {"dtype": "string", "shape": [None]}
    return spec


def _card_features(spec: dict) -> list[dict]:
    out = []
    for name, s in spec.items():
        dtype = {"int32": "int32", "string": "string"}[s["dtype"]]
        out.append({"name": name, "sequence": dtype} if s["shape"] else {"name": name, "dtype": dtype})
    return out


def _table(rows: list[dict], spec: dict) -> pa.Table:
    types = {"int32": pa.int32(), "string": pa.string()}
    fields = [pa.field(n, pa.list_(types[s["dtype"]]) if s["shape"] else types[s["dtype"]]) for n, s in spec.items()]
    schema = pa.schema(fields)
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in schema}, schema=schema)


def write_parquet_config(root: Path, config: str, splits: dict[str, list[dict]]) -> dict:
    """Parquet files of one config; returns its card entries ({"dataset_info": ..., "configs": ...})."""
    rows_all = [r for rows in splits.values() for r in rows]
    spec = _features(rows_all)
    (root / config).mkdir(parents=True, exist_ok=True)
    info_splits, data_files = [], []
    for split, rows in splits.items():
        path = root / config / f"{split}-00000-of-00001.parquet"
        pq.write_table(_table(rows, spec), path)
        info_splits.append({"name": split, "num_bytes": path.stat().st_size, "num_examples": len(rows)})
        data_files.append({"split": split, "path": f"{config}/{split}-*"})
    return {
        "dataset_info": {"config_name": config, "features": _card_features(spec), "splits": info_splits},
        "configs": {"config_name": config, "data_files": data_files},
    }


def write_tfrecord_config(root: Path, config: str, splits: dict[str, list[dict]]) -> None:
    folder = root / "data" / config
    folder.mkdir(parents=True, exist_ok=True)
    spec = _features([r for rows in splits.values() for r in rows])
    for split, rows in splits.items():
        payloads = (
            tfrecord.encode_example(
                {n: ([r[n]] if not spec[n]["shape"] else list(r.get(n) or [])) for n in spec if n in r}
            )
            for r in rows
        )
        tfrecord.write_records(folder / f"{split}.tfrecord-00000-of-00001", payloads)
        tfrecord.write_info(folder / f"info.{split}.json", spec)
        (folder / f"stats.{split}.json").write_text(json.dumps({"examples": len(rows)}), "utf-8")
    (folder / "COMPLETED").write_text("", "utf-8")


def write_replica(root: Path, configs: dict[str, dict[str, list[dict]]], layout="parquet", script: bool = True) -> Path:
    """`layout`: "parquet", "tfrecord" or "both", for every config or as {config: layout}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    card = {"dataset_info": [], "configs": []}
    for config, splits in configs.items():
        how = layout.get(config, "parquet") if isinstance(layout, dict) else layout
        if how in ("parquet", "both"):
            entry = write_parquet_config(root, config, splits)
            card["dataset_info"].append(entry["dataset_info"])
            card["configs"].append(entry["configs"])
        if how in ("tfrecord", "both"):
            write_tfrecord_config(root, config, splits)
    meta = {"language": ["en"], "license": ["apache-2.0"], "pretty_name": "P3", **card}
    (root / "README.md").write_text(
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n# Dataset Card for P3\n", "utf-8"
    )
    if script:
        (root / "P3.py").write_text(SCRIPT_STUB, "utf-8")
    return root
