"""`python -m data_prep` / `tensorpoly-ds prep`: parse arguments and run the pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from tpds_common.errors import EXIT_OK
from tpds_common.log import LOGGING_DESTS, add_logging_arguments, setup_from_args

from .mixture import mixture_names
from .pipeline import PrepConfig, build, load_prep_config
from .sources import SOURCE_KINDS


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


PROG = "python -m data_prep"


def parser() -> argparse.ArgumentParser:
    # Flags default to "not given" (SUPPRESS): PrepConfig's defaults apply, and a flag given wins over --config.
    p = argparse.ArgumentParser(
        prog=PROG,
        argument_default=argparse.SUPPRESS,
        description="Tokenise a P3-style mixture into sharded Arrow splits plus a manifest.",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        type=Path,
        help="YAML file of PrepConfig fields (mixture, source, out, num_shards, ...); several merge in "
        "order, flags win over them (docs/prep.md)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="fields set after the config files, e.g. num_shards=8 few_shot_seeds=[0,1]",
    )
    # No `choices=` on mixture/source: our own error lists the valid names and also covers local:PATH.
    # mixture, source, tokenizer and out are required, as flags or as keys of --config.
    p.add_argument("--mixture", help=f"one of: {', '.join(mixture_names())}")
    p.add_argument("--source", help=f"one of: {', '.join(SOURCE_KINDS)}")
    p.add_argument("--tokenizer", help="HF tokenizer name or path, or 'embedded' (offline)")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--num-shards", type=int, help="Arrow shards for train/val (default 4)")
    p.add_argument("--num-proc", type=int, help="worker processes, each preparing whole configs (default 1)")
    p.add_argument("--max-input-len", type=int)
    p.add_argument("--max-target-len", type=int)
    p.add_argument(
        "--cap-per-template",
        help="N (fixed cap), budget:B (min(size, B // n_templates)) or none; default budget:500000",
    )
    p.add_argument("--val-per-template", type=int)
    p.add_argument("--few-shot-seeds", type=_seeds, help="default 0,1024,42")
    p.add_argument("--few-shot-k", type=int, help="override every held-out task's default k")
    p.add_argument(
        "--train-tasks", type=_names, help="comma-separated subset of the mixture's training tasks (default: all)"
    )
    p.add_argument("--held-out", type=_names, help="comma-separated held-out tasks (default: all of the mixture's)")
    p.add_argument("--skip-invalid", action="store_true", help="drop malformed rows, counted in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR made with other arguments")
    p.add_argument(
        "--no-wait", action="store_true", help="if another prep holds DIR, exit 75 at once instead of waiting for it"
    )
    p.add_argument(
        "--drop-cache",
        action="store_true",
        help="delete the per-config part cache (.DIR.prep/parts) after a successful build",
    )
    add_logging_arguments(p)
    return p


def config_from_args(ns: argparse.Namespace) -> PrepConfig:
    """The flags given, over the --config files and KEY=VALUE overrides (tpds_common.config checks them)."""
    given = {k: v for k, v in vars(ns).items() if k not in ("config", "overrides", *LOGGING_DESTS)}
    if not ns.config and not ns.overrides:
        missing = [f"--{k}" for k in ("mixture", "source", "tokenizer", "out") if k not in given]
        if missing:  # argparse's own wording, as when these flags were required
            parser().error(f"the following arguments are required: {', '.join(missing)}")
    return load_prep_config(ns.config, ns.overrides, given)


def main(argv: list[str] | None = None) -> int:
    """Bad data or arguments raise DataError / ConfigError (exit 2), a DIR held by another prep with
    --no-wait OutputBusy (75, like every stage's "folder in use"): the caller maps them, report_user_errors."""
    ns = parser().parse_args(argv)
    setup_from_args(ns)
    build(config_from_args(ns))
    return EXIT_OK
