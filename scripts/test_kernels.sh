#!/usr/bin/env bash
# The determinism check of docs/development.md ("Determinism and tolerances"): rerun the in-process
# float-heavy tests once per forced CPU kernel path, so that a test comparing floats of two code paths
# bitwise (which passes only with the kernels of the machine it was written on) fails here, not on a
# user's machine. Usage: bash scripts/test_kernels.sh [PYTEST PATHS...]; PYTEST_ARGS adds pytest options,
# PYTHON names the interpreter [.venv/bin/python].
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
paths=("$@")
if [ "${#paths[@]}" -eq 0 ]; then
    paths=(tests/adapters tests/evaluation tests/analysis tests/adapt tests/engine)
fi
# ATEN_CPU_CAPABILITY=default: torch's non-vectorised kernels (what an Intel CPU's differing reduction order
# exposed); OMP_NUM_THREADS=1: one thread instead of the cores (reductions split differently);
# TPDS_TEST_NO_MKLDNN=1: oneDNN off in the test process (tests/conftest.py)
# TPDS_KERNEL_VARIANTS="VAR=VALUE ..." runs a subset
read -ra variants <<<"${TPDS_KERNEL_VARIANTS:-ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 TPDS_TEST_NO_MKLDNN=1}"
failed=()
for variant in "${variants[@]}"; do
    echo "=== $variant: ${paths[*]}"
    # shellcheck disable=SC2086
    if ! env "$variant" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}" \
        "${PYTHON:-.venv/bin/python}" -m pytest -q -p no:cacheprovider -m "not slow" ${PYTEST_ARGS:-} "${paths[@]}"; then
        failed+=("$variant")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed with: ${failed[*]}" >&2
    exit 1
fi
