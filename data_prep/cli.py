"""`python -m data_prep` / `tensorpoly-ds prep`: parse arguments and run the pipeline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpds_common.log import add_logging_arguments, setup_from_args

from .errors import ConfigError, DataError, OutputBusy
from .mixture import mixture_names
from .pipeline import DEFAULT_SEEDS, PrepConfig, build
from .sources import SOURCE_KINDS


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenise a P3-style mixture into sharded Arrow splits plus a manifest.")
    # No `choices=` on mixture/source: our own error lists the valid names and also covers local:PATH.
    p.add_argument("--mixture", required=True, help=f"one of: {', '.join(mixture_names())}")
    p.add_argument("--source", required=True, help=f"one of: {', '.join(SOURCE_KINDS)}")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer name or path, or 'embedded' (offline)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--num-shards", type=int, default=4, help="Arrow shards for train/val (default 4)")
    p.add_argument("--num-proc", type=int, default=1,
                   help="worker processes, each preparing whole configs (default 1)")
    p.add_argument("--max-input-len", type=int, default=256)
    p.add_argument("--max-target-len", type=int, default=256)
    p.add_argument("--cap-per-template", default=None,
                   help="N (fixed cap), budget:B (min(size, B // n_templates)) or none; default budget:500000")
    p.add_argument("--val-per-template", type=int, default=100)
    p.add_argument("--few-shot-seeds", type=_seeds, default=DEFAULT_SEEDS, help="default 0,1024,42")
    p.add_argument("--few-shot-k", type=int, default=None, help="override every held-out task's default k")
    p.add_argument("--train-tasks", type=_names, default=None,
                   help="comma-separated subset of the mixture's training tasks (default: all)")
    p.add_argument("--held-out", type=_names, default=None,
                   help="comma-separated held-out tasks (default: all of the mixture's)")
    p.add_argument("--skip-invalid", action="store_true", help="drop malformed rows, counted in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR made with other arguments")
    p.add_argument("--no-wait", action="store_true",
                   help="if another prep holds DIR, exit 75 at once instead of waiting for it")
    p.add_argument("--drop-cache", action="store_true",
                   help="delete the per-config part cache (.DIR.prep/parts) after a successful build")
    add_logging_arguments(p)
    return p


def config_from_args(ns: argparse.Namespace) -> PrepConfig:
    return PrepConfig(
        mixture=ns.mixture, source=ns.source, tokenizer=ns.tokenizer, out=ns.out.expanduser().resolve(),
        num_shards=ns.num_shards, num_proc=ns.num_proc, max_input_len=ns.max_input_len,
        max_target_len=ns.max_target_len, cap_per_template=ns.cap_per_template,
        val_per_template=ns.val_per_template, few_shot_seeds=tuple(ns.few_shot_seeds), few_shot_k=ns.few_shot_k,
        train_tasks=ns.train_tasks, held_out=ns.held_out, skip_invalid=ns.skip_invalid, overwrite=ns.overwrite,
        no_wait=ns.no_wait, drop_cache=ns.drop_cache)


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    setup_from_args(ns)
    try:
        build(config_from_args(ns))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputBusy as e:   # 75 (EX_TEMPFAIL) like every other stage's "folder in use": try again later
        print(f"error: {e}", file=sys.stderr)
        return 75
    return 0
