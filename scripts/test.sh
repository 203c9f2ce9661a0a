#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh "$@"
export DS_ACCELERATOR=cpu
# with --slurm the cluster tests must run: their fixture fails instead of skipping when Slurm is missing
for arg in "$@"; do
    if [ "$arg" = "--slurm" ]; then export TPDS_SLURM_REQUIRED=1; fi
done
export TPDS_REQUIRE_OPTIONAL=1   # setup.sh installed the test extra: an optional test dependency may not skip
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}"

# lint and format first: seconds, and a style slip fails before 15 minutes of tests (configured in pyproject.toml)
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# Two pytest sessions side by side, about even in CPU time: most tests use one core or wait (one-rank runs,
# gloo collectives, the Slurm tests on the local cluster's timers), so one session alone kept 2 CPUs 57 % busy
# (1370 CPU-s in 1200 s, measured). The main session holds the engine's tests, which share the session's
# baseline runs (tests/engine/conftest.py), the planner's, data_prep's and evaluation's; the side session the
# rest, the mostly waiting Slurm tests first, so that they overlap the engine's multi-rank runs. pytest runs the
# paths in the order given. The side session has its own temp folder and no pytest cache; its output is printed
# after the main one's.
beside=(tests/slurm tests/test_gpu_check.py tests/adapt tests/adapters tests/analysis tests/configs tests/replicate
        tests/test_demo.py)
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
