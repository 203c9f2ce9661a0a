#!/usr/bin/env bash
# Create .venv with the pinned CPU torch and the project (editable) with its test extra.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--slurm]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"

if [ "${1:-}" = "--slurm" ]; then
    bash "$root/scripts/slurm_local.sh" install
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>/dev/null))"
