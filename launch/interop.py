"""`tensorpoly-ds export` / `tensorpoly-ds import`: move adapters between tensorpoly-ds exports and peft.

    tensorpoly-ds export --format peft --adapter runs/poly/export --out peft/poly [--inference-only]
    tensorpoly-ds import --format peft --adapter peft/poly --out runs/imported/poly [--tasks rte,cb]

LoRA, Poly, MHR and (IA)^3 map (docs/adapters.md, "peft interop"); what cannot map is refused naming the
field and the value (exit status 2). Exit 0 prints the written directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/interop.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpds_common.errors import EXIT_OK  # noqa: E402
from tpds_common.log import add_logging_arguments, get_logger, setup_from_args  # noqa: E402 - after the path fix above

FORMATS = ("peft",)


def build_parser(command: str) -> argparse.ArgumentParser:
    what = {
        "export": ("a tensorpoly-ds export (RUN_DIR/export, a job's OUT/adapter)", "the peft adapter folder"),
        "import": (
            "a peft adapter folder (adapter_config.json + adapter_model.safetensors)",
            "the tensorpoly-ds export to write",
        ),
    }[command]
    p = argparse.ArgumentParser(
        prog=f"tensorpoly-ds {command}",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="the other side's format")
    p.add_argument("--adapter", required=True, help=what[0])
    p.add_argument("--out", required=True, help=what[1])
    p.add_argument(
        "--base-model",
        default=None,
        help="backbone (Hugging Face name or path, config.json, architecture name); default: the one "
        "recorded in the adapter",
    )
    p.add_argument(
        "--inference-only",
        action="store_true",
        help="accept differences that only matter in training (routing noise, dropout); evaluation "
        "outputs stay identical",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    if command == "import":
        p.add_argument(
            "--tasks",
            default=None,
            help="comma-separated task names, one per peft task id "
            "(default: the names recorded by `export`, else task0, ...)",
        )
    add_logging_arguments(p)
    return p


def run(command: str, argv: list[str] | None) -> int:
    args = build_parser(command).parse_args(argv)
    setup_from_args(args)
    from tensorpoly_ds.adapters.peft_interop import export_to_peft, import_from_peft

    # what cannot map (PeftInteropError, ExportError, ConfigError) is a UserError: exit 2, one line
    if command == "export":
        out, notes = export_to_peft(
            args.adapter, args.out, base_model=args.base_model, inference_only=args.inference_only, overwrite=args.force
        )
        for note in notes:
            get_logger().warning(f"tensorpoly-ds export: note: {note}")
    else:
        tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
        out = import_from_peft(
            args.adapter,
            args.out,
            base_model=args.base_model,
            tasks=tasks,
            inference_only=args.inference_only,
            overwrite=args.force,
        )
    print(out)
    return EXIT_OK


def export_main(argv: list[str] | None = None) -> int:
    return run("export", argv)


def import_main(argv: list[str] | None = None) -> int:
    return run("import", argv)
