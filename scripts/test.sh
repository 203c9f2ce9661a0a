#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh "$@"
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}"

# Two pytest sessions side by side. "beside" holds tests that leave a core idle: the Slurm tests wait on the
# local cluster's scheduler and signal timers, the GPU check's CPU smoke run uses one core. The rest runs in
# the main session, the planner's memory measurements included (their high-water marks grew by ~30 MB with
# another session running). The side session has its own temp folder and no pytest cache.
beside=(tests/slurm tests/test_gpu_check.py)
side_tmp="$(mktemp -d)"
trap 'rm -rf "$side_tmp"' EXIT
.venv/bin/python -m pytest -q --durations=10 -p no:cacheprovider --basetemp "$side_tmp/pytest" "${beside[@]}" \
    >"$side_tmp/log" 2>&1 &
side_pid=$!
ignore=()
for path in "${beside[@]}"; do ignore+=(--ignore "$path"); done
main=0
.venv/bin/python -m pytest -q --durations=30 "${ignore[@]}" tests || main=$?
side=0
wait "$side_pid" || side=$?
echo "=== side session (${beside[*]}): exit $side"
cat "$side_tmp/log"
if [ "$main" -ne 0 ] || [ "$side" -ne 0 ]; then
    echo "tests failed: main session exit $main, side session exit $side" >&2
    exit 1
fi
