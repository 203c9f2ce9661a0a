#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh "$@"
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}"
exec .venv/bin/python -m pytest -q --durations=30 tests
