"""A small prepared data directory in the docs/design.md format, built directly with `datasets`
(random ids, a handful of tasks, vocab 64). Tasks have learnable structure: the target is a function of
the task id and the input, so the loss can go down."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 64
TASKS = ["copy_first", "reverse_tail", "shift_one", "constant_a", "parity"]


def _target(task: int, x: list[int]) -> list[int]:
    if task == 0:
        y = x[:3]
    elif task == 1:
        y = x[::-1][:3]
    elif task == 2:
        y = [(t + 1) % (VOCAB - 2) + 2 for t in x[:3]]
    elif task == 3:
        y = [5, 6, 7]
    else:
        y = [2 + sum(x) % 2]
    return y + [1]


def _rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        task = rng.randrange(len(TASKS))
        x = [rng.randrange(2, VOCAB) for _ in range(rng.randint(4, 12))]
        rows.append({"task_id": task, "task_name": TASKS[task], "input_ids": x, "target_ids": _target(task, x)})
    return rows


def make_prepared_dir(out: Path, n_train: int = 256, n_val: int = 37, seed: int = 0) -> Path:
    import datasets

    out = Path(out)
    rng = random.Random(seed)
    features = datasets.Features({"task_id": datasets.Value("int32"), "task_name": datasets.Value("string"),
                                  "input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "target_ids": datasets.Sequence(datasets.Value("int32"))})
    for split, n in (("train", n_train), ("val", n_val)):
        datasets.Dataset.from_list(_rows(n, rng), features=features).save_to_disk(str(out / split), num_shards=2)
    manifest = {"format_version": 1, "tasks": TASKS, "held_out": [],
                "tokenizer": {"name_or_path": "tokenizer", "kind": "embedded", "vocab_size": VOCAB,
                              "pad_token_id": 0, "eos_token_id": 1},
                "max_input_len": 16, "max_target_len": 8, "mixture": "test", "source": "fixture", "rule": {},
                "counts": {"train": n_train, "val": n_val}, "truncated": {}, "skipped": {},
                "shards": {"train": 2, "val": 2}, "content_hash": "fixture", "args": {}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


if __name__ == "__main__":
    import sys

    print(make_prepared_dir(Path(sys.argv[1])))
