#!/usr/bin/env bash
# Submit slurm/adapt_array.sbatch as a job array with one task per row of a job table.
#
#   bash slurm/submit_array.sh [--parallel P] [--report-job ID] [--dry-run] TABLE [SBATCH_OPTION...] [-- ADAPT_ARG...]
#
#   TABLE            JSON Lines job table (`tensorpoly-ds sweep --expand-only` writes OUT/jobs.jsonl);
#                    N = number of non-blank lines; the array is --array=0-(N-1)[%P]
#   --parallel P     at most P array tasks at once (0: no limit) [0]
#   --report-job ID  after submitting, make pending job ID depend on the array (afterok; see
#                    TPDS_REPORT_DEPENDENCY): used by the pipeline, whose report job is submitted before the
#                    table exists
#   --dry-run        print the sbatch command instead of running it
#   SBATCH_OPTION    passed to sbatch before the script (e.g. --partition=gpu --time=1:00:00 --gpus=1)
#   ADAPT_ARG        appended to `tensorpoly-ds adapt --job-table TABLE --row I`
# Prints the array job id on stdout (the placeholder <adapt> with --dry-run).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "submit_array: error: $*" >&2; exit 2; }

parallel=0
report_job=""
dry_run=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --parallel) [ "$#" -ge 2 ] || usage; parallel="$2"; shift 2 ;;
        --parallel=*) parallel="${1#*=}"; shift ;;
        --report-job) [ "$#" -ge 2 ] || usage; report_job="$2"; shift 2 ;;
        --report-job=*) report_job="${1#*=}"; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) die "unknown option $1 (sbatch options go after TABLE)" ;;
        *) break ;;
    esac
done
[ "$#" -ge 1 ] || usage
table="$1"
shift
sbatch_opts=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do sbatch_opts+=("$1"); shift; done
[ "$#" -gt 0 ] && shift   # the --
adapt_args=("$@")

case "$parallel" in ''|*[!0-9]*) die "--parallel must be a non-negative integer, got '$parallel'" ;; esac
[ -r "$table" ] || die "job table $table is not readable"
table="$(cd "$(dirname "$table")" && pwd)/$(basename "$table")"
rows="$(awk 'NF { n++ } END { print n + 0 }' "$table")"
[ "$rows" -gt 0 ] || die "job table $table has no rows"
spec="0-$((rows - 1))"
if [ "$parallel" -gt 0 ]; then spec="$spec%$parallel"; fi

cmd=(sbatch --parsable "--array=$spec" "${sbatch_opts[@]}" "$here/adapt_array.sbatch" "$table" "${adapt_args[@]}")
dep_type="${TPDS_REPORT_DEPENDENCY:-afterok}"
if [ "$dry_run" -eq 1 ]; then
    echo "# adapt array: $rows rows of $table" >&2
    printf '%q ' "${cmd[@]}"
    printf '\n'
    if [ -n "$report_job" ]; then
        printf 'scontrol update JobId=%q Dependency=%q\n' "$report_job" "$dep_type:<adapt>"
    fi
    exit 0
fi
export TPDS_SLURM_HOME="${TPDS_SLURM_HOME:-$here}"
out="$("${cmd[@]}")" || die "sbatch failed: $out"
job="${out%%;*}"
case "$job" in ''|*[!0-9]*) die "unexpected sbatch output: $out" ;; esac
if [ -n "$report_job" ]; then
    scontrol update "JobId=$report_job" "Dependency=$dep_type:$job" \
        || die "array $job submitted, but could not make job $report_job depend on it"
fi
echo "submit_array: job table $table: $rows rows -> array job $job (--array=$spec)" >&2
printf '%s\n' "$job"
