"""What checkpoint content checksums cost: our SHA-256 (1 MiB blocks, tensorpoly_ds.engine.checkpoint.file_digest)
beside a plain read and the alternatives one could pick (CRC-32, BLAKE2b), on one file, in one run; then the
cost extrapolated to the checkpoints of the papers' runs.

The file is read twice before timing, so the numbers are for a warm page cache: that is the case right after
a save (the writer hashes what it just wrote). A resume on another node reads cold: add the file system's
read time. Every rank hashes a share of a tag's files (largest first), so a tag of W equal shards takes
about 1/W of the single-process time.

Usage: python benchmarks/bench_checkpoints.py [--quick] [--mib 512] [--dir /path/on/the/checkpoint/fs]
       [--out benchmarks/results/checkpoints.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
import zlib
from pathlib import Path

from tensorpoly_ds.engine.checkpoint import BLOCK, file_digest

GB = 1e9
# T0-3B: 2.85e9 parameters. FullFT checkpoint = fp32 weights (11.4 GB) + optimizer states: AdamW 2 x 11.4 GB,
# Adafactor factored moments (small). Adapter runs: TensorPoly-I R8 N4 = 4.3e6 parameters (REFERENCE table),
# fp32 + AdamW states = 3 x 4 bytes each, plus the frozen backbone for as long as DeepSpeed saves it too.
CASES = [
    ("FullFT T0-3B, fp32 weights only (the 11 GB file)", 11.4 * GB),
    ("FullFT T0-3B, weights + AdamW states", 3 * 11.4 * GB),
    ("TensorPoly-I R8 N4 adapters + AdamW states", 4.3e6 * 12),
    ("same, with the frozen backbone in the model-states file", 4.3e6 * 12 + 11.4 * GB),
]


def stream(path: Path, update) -> float:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            update(view[:n])
    return time.perf_counter() - start


def crc32(path: Path) -> float:
    state = [0]

    def update(block):
        state[0] = zlib.crc32(block, state[0])

    return stream(path, update)


def hashed(name: str):
    def run(path: Path) -> float:
        h = hashlib.new(name)
        return stream(path, h.update)

    return run


def ours(path: Path) -> float:
    start = time.perf_counter()
    file_digest(path)
    return time.perf_counter() - start


def best_of(fn, path: Path, repeats: int) -> float:
    return min(fn(path) for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 128 MiB file, 2 repeats")
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the test file (default: the temp directory)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    mib, repeats = (128, 2) if args.quick else (args.mib, args.repeats)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "shard.bin"
        with open(path, "wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(1 << 20))
        for _ in range(2):
            stream(path, lambda block: None)  # warm the page cache
        size = path.stat().st_size
        rows = []
        for name, fn in [
            ("read only (no hash)", lambda q: stream(q, lambda block: None)),
            ("sha256, 1 MiB blocks (ours)", ours),
            ("crc32 (zlib)", crc32),
            ("blake2b", hashed("blake2b")),
        ]:
            seconds = best_of(fn, path, repeats)
            rows.append({"method": name, "seconds": seconds, "gb_per_s": size / seconds / GB})
    ours_rate = rows[1]["gb_per_s"] * GB
    print(
        f"{mib} MiB file, warm page cache, best of {repeats} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs)\n"
    )
    print(f"{'method':<34} {'seconds':>8} {'GB/s':>7}")
    print("-" * 51)
    for r in rows:
        print(f"{r['method']:<34} {r['seconds']:>8.3f} {r['gb_per_s']:>7.2f}")
    print(f"\n{'checkpoint (one process hashing)':<58} {'size GB':>8} {'sha256 s':>9}")
    print("-" * 77)
    estimates = []
    for name, nbytes in CASES:
        estimates.append({"checkpoint": name, "bytes": nbytes, "sha256_seconds": nbytes / ours_rate})
        print(f"{name:<58} {nbytes / GB:>8.2f} {nbytes / ours_rate:>9.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "file_mib": mib,
                    "repeats": repeats,
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "methods": rows,
                    "estimates": estimates,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
