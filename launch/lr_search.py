"""`tensorpoly-ds lr-search`: choose a method's pretraining learning rates on multi-task validation loss.

    tensorpoly-ds lr-search --config configs/pretrain/tiny_cpu.yaml data.dir=DIR \
        --module-lrs 1e-3,3e-3,1e-2,3e-2 --routing-lrs 0.01,0.1,1 --steps 150 --out runs/lr_search/poly

One short pretraining run per candidate (OUT/runs/<candidate>/, each an ordinary resumable run), scored by its
final validation loss; the module lr first, then the routing lr at the chosen module lr (learned routing
only); a choice at the edge of its grid extends the grid (tensorpoly_ds/engine/lr_search.py has the rule).
OUT/lr_search.json holds every candidate's loss and the choice; rerunning the command reuses finished
candidates. Each candidate is launched as `--launcher` (default: this Python, `-m launch.pretrain`) plus
`--config OUT/runs/<candidate>/run.yaml --resume auto`, e.g. `--launcher "srun python -m launch.pretrain"` inside
an allocation, `--workers` at a time. Exit status (tpds_common.errors): 0 done, 1 a candidate failed (one line
naming it) or a bug (a traceback), 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/lr_search.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpds_common.errors import EXIT_OK, report_user_errors  # noqa: E402
from tpds_common.log import add_logging_arguments, setup_from_args  # noqa: E402 - after the path fix above

PROG = "tensorpoly-ds lr-search"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        action="append",
        default=[],
        required=True,
        help="YAML run config; repeat to compose (later wins), as for `tensorpoly-ds pretrain`",
    )
    p.add_argument("--module-lrs", type=_floats, required=True, help="candidate module lrs, e.g. 1e-3,3e-3,1e-2")
    p.add_argument(
        "--routing-lrs",
        type=_floats,
        default=[],
        help="candidate routing lrs, searched at the chosen module lr (learned routing only)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="steps per candidate run (default: the config's train.steps)"
    )
    p.add_argument("--max-extensions", type=int, default=2, help="edge-rule extensions per axis (default 2)")
    p.add_argument("--out", required=True, help="search directory: OUT/runs/<candidate>/ and OUT/lr_search.json")
    p.add_argument("--workers", type=int, default=1, help="candidate runs at a time (default 1)")
    p.add_argument(
        "--launcher", default=None, help="command prefix that runs one pretraining (default: python -m launch.pretrain)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config, e.g. data.dir=DIR")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    from tensorpoly_ds.engine.config import RunConfigError, load_run_config
    from tensorpoly_ds.engine.lr_search import LrSearchError, LrSearchSection, search
    from tensorpoly_ds.engine.run_pool import run_pretraining

    # the whole config is checked before any run (exit 2); a failed candidate run is JobFailed (exit 1)
    if args.workers < 1:
        raise LrSearchError(f"--workers {args.workers}: must be >= 1")
    cfg = load_run_config(args.config, args.overrides)
    if not cfg.data.dir:
        raise RunConfigError("key 'data.dir' is empty: set it to a prepared data directory")
    spec = LrSearchSection(
        module_lrs=args.module_lrs, routing_lrs=args.routing_lrs, steps=args.steps, max_extensions=args.max_extensions
    )
    spec.validate(PROG)
    base = cfg.to_dict()
    # the candidate runs start in the repository root: paths given relative to here must still resolve
    base["data"]["dir"] = str(Path(cfg.data.dir).resolve())
    if Path(cfg.model.name_or_path).exists():
        base["model"]["name_or_path"] = str(Path(cfg.model.name_or_path).resolve())
    command = shlex.split(args.launcher) if args.launcher else None
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    out = Path(args.out).resolve()
    result = search(base, spec, out, lambda runs: run_pretraining(runs, out, args.workers, threads, command=command))
    print(f"[lr-search] chosen: {result['chosen']} (run {result['chosen_run']}); {out / 'lr_search.json'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(report_user_errors(PROG, main))
