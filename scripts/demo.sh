#!/usr/bin/env bash
# Set up (if needed) and run the demo: the whole pipeline on the embedded mixture, on the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}"
exec .venv/bin/tensorpoly-ds demo "$@"
