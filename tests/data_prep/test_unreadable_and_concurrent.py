"""Issue #9, data prep: unreadable files are named errors (exit 2, no traceback), empty training
files and few-shot pools are errors or listed skips, edited sources are noticed on a rerun, and
two preps on one DIR never both write it."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HELD, TRAIN_CONFIGS, emb_args, local_args, make_dump, p3_rows, rte_configs, write_split

from data_prep.manifest import read_manifest
from data_prep.pipeline import PrepConfig, build, work_dir

REPO = Path(__file__).resolve().parents[2]


def _fails_cleanly(run, capsys, args, *needles):
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def _replace(dump, config, split, fmt, data: bytes):
    for p in (dump / config).glob(f"{split}.*"):
        p.unlink()
    path = dump / config / f"{split}.{fmt}"
    path.write_bytes(data)
    return path


def test_non_utf8_json_lines(tmp_path, run, capsys):
    dump = make_dump(tmp_path / "dump")
    c = TRAIN_CONFIGS[1]
    lines = (dump / c / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b"sentence", b"sent\xe9nce")  # Latin-1 byte in a UTF-8 file
    path = _replace(dump, c, "train", "jsonl", b"".join(lines))
    _fails_cleanly(
        run,
        capsys,
        local_args(dump, tmp_path / "out"),
        f"cannot read {path}",
        f"config {c!r}",
        "row 6, line 7",
        "not valid UTF-8 (byte 0xe9",
    )


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
@pytest.mark.parametrize("content", ["empty", "random", "truncated"])
def test_unreadable_binary_files(tmp_path, run, capsys, fmt, content):
    dump = make_dump(tmp_path / "dump")
    c = rte_configs()[1]
    good = write_split(tmp_path / "good", "train", p3_rows(c, "train", 60), fmt).read_bytes()
    data = {"empty": b"", "random": random.Random(0).randbytes(4096), "truncated": good[: len(good) * 2 // 3]}[content]
    path = _replace(dump, c, "train", fmt, data)
    err = _fails_cleanly(run, capsys, local_args(dump, tmp_path / "out"), f"cannot read {path}", f"config {c!r}")
    assert not (tmp_path / "out").exists()
    assert {"empty": "empty file", "random": "not", "truncated": ""}[content] in err


def test_corrupt_tfrecord_names_the_record(tmp_path, run, capsys):
    from data_prep.p3_replica import write_replica

    rows = {c: {"train": p3_rows(c, "train", 40)} for c in TRAIN_CONFIGS}
    rows.update(
        {c: {"train": p3_rows(c, "train", 60), "validation": p3_rows(c, "validation", 12)} for c in rte_configs()}
    )
    root = write_replica(tmp_path / "P3", rows, layout="tfrecord")
    path = root / "data" / TRAIN_CONFIGS[0] / "train.tfrecord-00000-of-00001"
    data = bytearray(path.read_bytes())
    offsets, pos = [], 0
    for _ in range(4):  # walk to record 3
        offsets.append(pos)
        pos += 12 + int.from_bytes(data[pos : pos + 8], "little") + 4
    data[pos + 20] ^= 0x01
    path.write_bytes(bytes(data))
    _fails_cleanly(
        run, capsys, local_args(root, tmp_path / "out"), f"cannot read {path}", "record 4", "data CRC mismatch"
    )


def test_empty_training_file_and_empty_pool(tmp_path, run, capsys):
    dump = make_dump(tmp_path / "dump")
    c = TRAIN_CONFIGS[1]
    train_path = _replace(dump, c, "train", "jsonl", b"")
    pool_path = _replace(dump, rte_configs()[2], "train", "jsonl", b"\n")
    _fails_cleanly(
        run,
        capsys,
        local_args(dump, tmp_path / "out"),
        str(train_path),
        "the training split is empty (0 rows)",
        "--skip-invalid",
    )
    (train_path).write_text(json.dumps(p3_rows(c, "train", 1)[0]) + "\n")  # non-empty: now the pool is next
    _fails_cleanly(run, capsys, local_args(dump, tmp_path / "out"), str(pool_path), "the few-shot pool is empty")
    train_path.write_bytes(b"")
    assert run(local_args(dump, tmp_path / "out", "--skip-invalid")) == 0
    m = read_manifest(tmp_path / "out")
    assert m.skipped["empty"] == sorted([f"{c}/train", f"{rte_configs()[2]}/train"])
    assert m.counts["train"][c] == 0 and m.tasks == TRAIN_CONFIGS  # task ids stay those of the registry
    from data_prep.mixture import get_mixture

    template = get_mixture("t0_train").held_out_task(HELD).templates[2][0]
    assert m.few_shot[HELD]["templates_excluded"] == [template]


def test_edited_source_is_rebuilt_touch_is_not(tmp_path, emb_dir, tpds_messages):
    dump = make_dump(tmp_path / "dump")
    cfg = PrepConfig(
        "t0_train",
        f"local:{dump}",
        str(emb_dir / "tokenizer"),
        tmp_path / "out",
        train_tasks=tuple(TRAIN_CONFIGS),
        held_out=(HELD,),
        val_per_template=5,
        few_shot_k=8,
    )
    logs = tpds_messages  # the project logger's lines (tests/conftest.py)
    logs.clear()
    first = build(cfg)
    assert first.parts_built == 3
    path = dump / TRAIN_CONFIGS[0] / "train.jsonl"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert build(cfg).status == "unchanged"
    rows = p3_rows(TRAIN_CONFIGS[0], "train", 40)
    rows[0]["inputs_pretokenized"] = "an edited first row"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # edited in place
    logs.clear()
    again = build(cfg)
    assert again.status == "built" and (again.parts_built, again.parts_reused) == (1, 2)
    assert any("source data changed" in m and f"{TRAIN_CONFIGS[0]}/train" in m for m in logs)
    assert again.manifest.content_hash != first.manifest.content_hash
    assert again.manifest.sources[f"{TRAIN_CONFIGS[0]}/train"] != first.manifest.sources[f"{TRAIN_CONFIGS[0]}/train"]


HOLD = """
import sys, time
from pathlib import Path
from tpds_common.locking import FolderLock
lock = FolderLock(Path(sys.argv[2]), what="test holder").acquire()
print("holding", flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


def _cli(*args):
    return [sys.executable, "-m", "data_prep", *args]


@pytest.mark.slow
def test_second_prep_refuses_or_waits_for_the_holder(tmp_path):
    out = tmp_path / "o"
    release = tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), str(work_dir(out)), str(release)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        refused = subprocess.run(
            _cli(*emb_args(out, "--no-wait")), capture_output=True, text=True, env=env, timeout=300
        )
        assert refused.returncode == 75 and f"pid {holder.pid}" in refused.stderr and "--no-wait" in refused.stderr
        assert "Traceback" not in refused.stderr and not out.exists()
        waiter = subprocess.Popen(_cli(*emb_args(out)), stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        line = ""
        while "waiting" not in line and time.time() < deadline:
            line = waiter.stderr.readline()
        assert f"pid {holder.pid}" in line and "waiting" in line
        assert waiter.poll() is None and not out.exists()  # still blocked while the holder lives
        release.touch()
        holder.wait(timeout=60)
        _, err = waiter.communicate(timeout=300)
        assert waiter.returncode == 0, err
        assert read_manifest(out).counts["totals"]["train"] > 0
    finally:
        release.touch()
        holder.kill()


@pytest.mark.slow
def test_two_preps_with_different_arguments_never_both_win(tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(_cli(*emb_args(out, "--max-input-len", str(n))), stderr=subprocess.PIPE, text=True, env=env)
        for n in (20, 30)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "different arguments" in loser and "max_input_len" in loser
    winner_len = 20 if results[0][0] == 0 else 30
    assert read_manifest(out).max_input_len == winner_len
