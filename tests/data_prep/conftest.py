"""Shared helpers: a tiny P3-style local dump and a wrapper around the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.cli import PROG, main
from data_prep.mixture import get_mixture
from tpds_common.errors import report_user_errors

TRAIN_CONFIGS = ["glue_mrpc_equivalent", "glue_mrpc_paraphrase"]  # glue/mrpc has 7 templates
HELD = "rte"


def p3_rows(config: str, split: str, n: int, choices: bool = True) -> list[dict]:
    """P3-format records with a little variety; targets are among the choices when choices is set."""
    rows = []
    for i in range(n):
        r = {
            "inputs_pretokenized": f"{config} {split} sentence number {i} says {'yes' if i % 2 else 'no'} ?",
            "targets_pretokenized": "yes" if i % 2 else "no",
            "inputs": [5, 6, 7],
            "targets": [8, 1],
        }
        if choices:
            r["answer_choices"] = ["no", "yes"]
        rows.append(r)
    return rows


def write_split(folder: Path, split: str, rows: list[dict], fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    elif fmt == "parquet":
        path = folder / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "arrow":
        path = folder / f"{split}.arrow"
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    else:
        raise ValueError(fmt)
    return path


def rte_configs() -> list[str]:
    return [c for _, c in get_mixture("t0_train").held_out_task(HELD).templates]


def make_dump(root: Path, fmt: str = "jsonl", n_train: int = 40, n_eval: int = 12, n_shots: int = 60) -> Path:
    for c in TRAIN_CONFIGS:
        write_split(root / c, "train", p3_rows(c, "train", n_train), fmt)
    for c in rte_configs():
        write_split(root / c, "validation", p3_rows(c, "validation", n_eval), fmt)
        write_split(root / c, "train", p3_rows(c, "train", n_shots), fmt)
    return root


def local_args(dump: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--mixture",
        "t0_train",
        "--source",
        f"local:{dump}",
        "--tokenizer",
        "embedded",
        "--out",
        str(out),
        "--train-tasks",
        ",".join(TRAIN_CONFIGS),
        "--held-out",
        HELD,
        "--num-shards",
        "2",
        "--val-per-template",
        "5",
        "--few-shot-k",
        "8",
        *extra,
    ]


# Small embedded run: caps keep it to ~1-2 s.
EMB = [
    "--mixture",
    "embedded",
    "--source",
    "embedded",
    "--tokenizer",
    "embedded",
    "--cap-per-template",
    "40",
    "--val-per-template",
    "10",
    "--num-shards",
    "3",
]


def emb_args(out: Path, *extra: str) -> list[str]:
    return [*EMB, "--out", str(out), *extra]


@pytest.fixture
def run():
    def _run(argv: list[str]) -> int:  # as `python -m data_prep`: user errors become exit codes
        return report_user_errors(PROG, main, argv)

    return _run


@pytest.fixture(scope="session")
def emb_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "prep"
    assert main(emb_args(out)) == 0
    return out
