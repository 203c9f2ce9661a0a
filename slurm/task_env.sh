#!/usr/bin/env bash
# Per-task prologue of slurm/pretrain.sbatch, run by srun on every node: create this node's per-job
# TORCH_EXTENSIONS_DIR (seeded from TPDS_TORCH_EXT_SEED if set), then exec the command (same pid, so
# signals from srun reach it).   Usage: task_env.sh COMMAND [ARGS...]
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
tpds_prepare_torch_ext
exec "$@"
