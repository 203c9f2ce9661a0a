#!/usr/bin/env bash
# Submit the TensorPoly-DS pipeline as a chain of Slurm jobs, each waiting for the previous one to
# succeed (--dependency=afterok:<id>, --kill-on-invalid-dep=yes so a failure cancels the rest):
#
#   prep -> pretrain -> sweep (job table) -> adapt array (one task per table row) -> report
#
# A stage is submitted only when its inputs are given, so any contiguous part of the chain works
# (e.g. only --table + --report-out to adapt an existing export).
#
# Usage: bash slurm/submit_pipeline.sh [OPTIONS]
#
# Stages and their arguments (ARG options repeat; each occurrence is one argument, spaces kept):
#   --prep-arg ARG          argument of `tensorpoly-ds prep` (e.g. --prep-arg --out --prep-arg /data/p3);
#                           the prep job is submitted when at least one is given
#   --pretrain-config FILE  run config of `tensorpoly-ds pretrain --config FILE` (repeatable, composed in order);
#                           the pretrain job is submitted when at least one is given
#   --pretrain-arg ARG      extra pretrain argument, e.g. data.dir=/data/p3 or run.dir=runs/poly
#   --grid FILE             sweep grid: a sweep job expands it after pretraining into SWEEP_DIR/jobs.jsonl and
#                           submits the adapt array sized to it (the table can depend on pretrain/prep outputs)
#   --sweep-out DIR         sweep directory (required with --grid) [jobs.jsonl and jobs/<id>/ go there]
#   --sweep-arg ARG         extra sweep argument
#   --table FILE            an existing job table instead of --grid: the array size is computed now
#   --adapt-arg ARG         extra argument of `tensorpoly-ds adapt --job-table T --row I`
#   --report-out DIR        report directory; the report job is submitted when given
#   --report-arg ARG        extra report argument (default run dir: the sweep dir / the table's directory)
#   --report-after ok|any   report after the array succeeded (afterok, default) or finished in any state
#                           (afterany: the report then lists the failed rows)
#
# Resources:
#   --partition P, --account A, --qos Q     added to every job
#   --time T                                time limit of every job (sbatch syntax, e.g. 2-00:00:00)
#   --prep-time T, --pretrain-time T, --sweep-time T, --adapt-time T, --report-time T   per-stage limits
#   --nodes N                               pretrain nodes [1]
#   --gpus-per-node G                       pretrain GPUs per node; one task per GPU [0 = CPU run]
#   --tasks-per-node T                      pretrain tasks per node when G = 0 [1]
#   --cpus-per-task C                       CPUs per pretrain task [Slurm default]
#   --signal-lead S                         SIGUSR1 this many seconds before the pretrain time limit [120]
#   --adapt-gpus G                          GPUs per adaptation task [1 if --gpus-per-node > 0, else 0]
#   --adapt-cpus C                          CPUs per adaptation task [2]
#   --parallel P                            at most P adaptation tasks at once [0 = no limit]
#   --prep-cpus C                           CPUs of the prep job [4]
#   --sbatch-arg ARG                        extra sbatch option for every job (repeatable), e.g. --sbatch-arg=--mail-type=FAIL
#   --after JOBID                           make the first job wait for JOBID (afterok)
#
# Environment:
#   --env-file FILE     sourced at the start of every job (module loads, `source .venv/bin/activate`, exports);
#                       exported to the jobs as TPDS_ENV_FILE
#   --log-dir DIR       job logs: DIR/<job name>-<job id>.out, arrays DIR/tpds-adapt-<array id>_<task>.out [logs/slurm]
#   --dry-run           print the sbatch commands (with <prep>, <pretrain>, ... for the job ids) and submit nothing
#
# Output: one line per submitted job, "<stage> <job id>". Stage commands can be replaced for testing or
# site wrappers with TPDS_CMD / TPDS_<STAGE>_CMD (see docs/slurm.md); they are passed to the jobs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,52p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "submit_pipeline: error: $*" >&2; exit 2; }

prep_args=(); pretrain_configs=(); pretrain_args=(); sweep_args=(); adapt_args=(); report_args=(); extra_sbatch=()
grid=""; sweep_out=""; table=""; report_out=""; report_after="ok"
partition=""; account=""; qos=""; time_all=""
prep_time=""; pretrain_time=""; sweep_time=""; adapt_time=""; report_time=""
nodes=1; gpus_per_node=0; tasks_per_node=1; cpus_per_task=""; signal_lead=120
adapt_gpus=""; adapt_cpus=2; parallel=0; prep_cpus=4; after=""
env_file=""; log_dir="logs/slurm"; dry_run=0

while [ "$#" -gt 0 ]; do
    opt="$1"
    case "$opt" in
        --dry-run) dry_run=1; shift; continue ;;
        -h|--help) usage 0 ;;
        --*=*) val="${opt#*=}"; opt="${opt%%=*}"; shift ;;
        --*) [ "$#" -ge 2 ] || die "$opt needs a value"; val="$2"; shift 2 ;;
        *) die "unexpected argument '$opt' (see --help)" ;;
    esac
    case "$opt" in
        --prep-arg) prep_args+=("$val") ;;
        --pretrain-config) pretrain_configs+=("$val") ;;
        --pretrain-arg) pretrain_args+=("$val") ;;
        --grid) grid="$val" ;;
        --sweep-out) sweep_out="$val" ;;
        --sweep-arg) sweep_args+=("$val") ;;
        --table) table="$val" ;;
        --adapt-arg) adapt_args+=("$val") ;;
        --report-out) report_out="$val" ;;
        --report-arg) report_args+=("$val") ;;
        --report-after) report_after="$val" ;;
        --partition) partition="$val" ;;
        --account) account="$val" ;;
        --qos) qos="$val" ;;
        --time) time_all="$val" ;;
        --prep-time) prep_time="$val" ;;
        --pretrain-time) pretrain_time="$val" ;;
        --sweep-time) sweep_time="$val" ;;
        --adapt-time) adapt_time="$val" ;;
        --report-time) report_time="$val" ;;
        --nodes) nodes="$val" ;;
        --gpus-per-node) gpus_per_node="$val" ;;
        --tasks-per-node) tasks_per_node="$val" ;;
        --cpus-per-task) cpus_per_task="$val" ;;
        --signal-lead) signal_lead="$val" ;;
        --adapt-gpus) adapt_gpus="$val" ;;
        --adapt-cpus) adapt_cpus="$val" ;;
        --parallel) parallel="$val" ;;
        --prep-cpus) prep_cpus="$val" ;;
        --sbatch-arg) extra_sbatch+=("$val") ;;
        --after) after="$val" ;;
        --env-file) env_file="$val" ;;
        --log-dir) log_dir="$val" ;;
        *) die "unknown option $opt (see --help)" ;;
    esac
done

is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
for pair in "nodes:$nodes" "gpus-per-node:$gpus_per_node" "tasks-per-node:$tasks_per_node" \
    "signal-lead:$signal_lead" "adapt-cpus:$adapt_cpus" "parallel:$parallel" "prep-cpus:$prep_cpus"; do
    is_uint "${pair#*:}" || die "--${pair%%:*} must be a non-negative integer, got '${pair#*:}'"
done
[ -z "$cpus_per_task" ] || is_uint "$cpus_per_task" || die "--cpus-per-task must be an integer"
[ -z "$adapt_gpus" ] || is_uint "$adapt_gpus" || die "--adapt-gpus must be an integer"
[ -z "$after" ] || is_uint "$after" || die "--after must be a job id"
case "$report_after" in ok|any) ;; *) die "--report-after must be ok or any" ;; esac
[ -z "$grid" ] || [ -z "$table" ] || die "give --grid or --table, not both"
[ -z "$grid" ] || [ -n "$sweep_out" ] || die "--grid needs --sweep-out DIR"
[ -z "$grid" ] || [ -r "$grid" ] || die "grid $grid is not readable"
[ -z "$table" ] || [ -r "$table" ] || die "job table $table is not readable (with a grid, use --grid/--sweep-out)"
[ -z "$env_file" ] || [ -r "$env_file" ] || die "env file $env_file is not readable"
if [ "${#prep_args[@]}" -eq 0 ] && [ "${#pretrain_configs[@]}" -eq 0 ] && [ -z "$grid" ] && [ -z "$table" ] \
    && [ -z "$report_out" ]; then
    die "nothing to submit: give --prep-arg, --pretrain-config, --grid/--table and/or --report-out (see --help)"
fi
if [ -z "$adapt_gpus" ]; then
    if [ "$gpus_per_node" -gt 0 ]; then adapt_gpus=1; else adapt_gpus=0; fi
fi

# Paths the jobs see must not depend on their working directory.
[ -z "$grid" ] || grid="$(abspath "$grid")"
[ -z "$sweep_out" ] || sweep_out="$(abspath "$sweep_out")"
[ -z "$table" ] || table="$(abspath "$table")"
[ -z "$report_out" ] || report_out="$(abspath "$report_out")"
[ -z "$env_file" ] || env_file="$(abspath "$env_file")"
log_dir="$(abspath "$log_dir")"

# What the jobs inherit (sbatch's default --export=ALL).
export TPDS_SLURM_HOME="$here"
if [ -n "$env_file" ]; then export TPDS_ENV_FILE="$env_file"; fi

site=(--kill-on-invalid-dep=yes)   # options of every job
[ -z "$partition" ] || site+=("--partition=$partition")
[ -z "$account" ] || site+=("--account=$account")
[ -z "$qos" ] || site+=("--qos=$qos")
site+=("${extra_sbatch[@]}")
common=(--parsable "${site[@]}")
time_opt() { local t="${1:-$time_all}"; if [ -n "$t" ]; then printf -- '--time=%s\n' "$t"; fi; }

prev=""          # id (or placeholder) of the last job in the chain
dep_opts() {     # dependency options for the next job, one per line
    if [ -n "$prev" ]; then printf -- '--dependency=afterok:%s\n' "$prev"
    elif [ -n "$after" ]; then printf -- '--dependency=afterok:%s\n' "$after"
    fi
}

if [ "$dry_run" -eq 1 ]; then
    echo "# dry run: nothing is submitted; <stage> stands for that stage's job id"
    printf 'export TPDS_SLURM_HOME=%q\n' "$TPDS_SLURM_HOME"
    [ -z "$env_file" ] || printf 'export TPDS_ENV_FILE=%q\n' "$env_file"
    printf 'mkdir -p %q\n' "$log_dir"
else
    mkdir -p "$log_dir"
fi

submit() {  # submit STAGE SBATCH_ARGV...: run or print; set $prev to the job id (or <STAGE>)
    local stage="$1" out job
    shift
    if [ "$dry_run" -eq 1 ]; then
        printf '%q ' "$@"
        printf '\n'
        prev="<$stage>"
        return 0
    fi
    out="$("$@")" || die "sbatch for stage $stage failed"
    job="${out%%;*}"
    is_uint "$job" || die "unexpected sbatch output for $stage: $out"
    printf '%s %s\n' "$stage" "$job"
    prev="$job"
}

mapfile -t time_prep < <(time_opt "$prep_time")
mapfile -t time_pretrain < <(time_opt "$pretrain_time")
mapfile -t time_sweep < <(time_opt "$sweep_time")
mapfile -t time_adapt < <(time_opt "$adapt_time")
mapfile -t time_report < <(time_opt "$report_time")

# 1. prep
if [ "${#prep_args[@]}" -gt 0 ]; then
    mapfile -t deps < <(dep_opts)
    submit prep sbatch "${common[@]}" "${deps[@]}" "${time_prep[@]}" "--cpus-per-task=$prep_cpus" \
        "--output=$log_dir/%x-%j.out" "$here/prep.sbatch" "${prep_args[@]}"
fi

# 2. pretrain
if [ "${#pretrain_configs[@]}" -gt 0 ]; then
    mapfile -t deps < <(dep_opts)
    res=("--nodes=$nodes")
    if [ "$gpus_per_node" -gt 0 ]; then
        res+=("--ntasks-per-node=$gpus_per_node" "--gpus-per-node=$gpus_per_node")
    else
        res+=("--ntasks-per-node=$tasks_per_node")
    fi
    [ -z "$cpus_per_task" ] || res+=("--cpus-per-task=$cpus_per_task")
    res+=("--signal=B:USR1@$signal_lead")
    cfg_args=()
    for c in "${pretrain_configs[@]}"; do cfg_args+=(--config "$(abspath "$c")"); done
    submit pretrain sbatch "${common[@]}" "${deps[@]}" "${time_pretrain[@]}" "${res[@]}" \
        "--output=$log_dir/%x-%j.out" "$here/pretrain.sbatch" "${cfg_args[@]}" "${pretrain_args[@]}"
fi

# 3. sweep + adapt array + report
adapt_res=("--cpus-per-task=$adapt_cpus" "--output=$log_dir/%x-%A_%a.out")
[ "$adapt_gpus" -eq 0 ] || adapt_res+=("--gpus=$adapt_gpus")
array_parallel=()
[ "$parallel" -eq 0 ] || array_parallel=(--parallel "$parallel")
report_dep="after$report_after"
run_dir=""
if [ -n "$grid" ]; then run_dir="$sweep_out"; elif [ -n "$table" ]; then run_dir="$(dirname "$table")"; fi

if [ -n "$table" ]; then
    mapfile -t deps < <(dep_opts)
    dry=()
    [ "$dry_run" -eq 0 ] || dry=(--dry-run)
    out="$(bash "$here/submit_array.sh" "${dry[@]}" "${array_parallel[@]}" "$table" \
        "${site[@]}" "${deps[@]}" "${time_adapt[@]}" "${adapt_res[@]}" -- "${adapt_args[@]}")" \
        || die "submitting the adapt array failed"
    if [ "$dry_run" -eq 1 ]; then
        printf '%s\n' "$out"
        prev="<adapt>"
    else
        printf 'adapt %s\n' "$out"
        prev="$out"
    fi
elif [ -n "$grid" ]; then
    mapfile -t deps < <(dep_opts)
    # The array arguments, NUL-separated, for the sweep job; the report job id is filled in below.
    argv_file="$sweep_out/.submit_array.argv"
    [ "$dry_run" -eq 1 ] || mkdir -p "$sweep_out"
    # Held until its argument file (which names the report job, submitted next) is written.
    submit sweep env "TPDS_ARRAY_ARGV_FILE=$argv_file" "TPDS_REPORT_DEPENDENCY=$report_dep" \
        sbatch "${common[@]}" --hold "${deps[@]}" "${time_sweep[@]}" "--output=$log_dir/%x-%j.out" \
        "$here/sweep.sbatch" "$sweep_out" --grid "$grid" "${sweep_args[@]}"
    sweep_job="$prev"
    report_job=""
    if [ -n "$report_out" ]; then
        # submitted now so that its id can be printed; the sweep job re-points its dependency at the array
        submit report sbatch "${common[@]}" "--dependency=afterok:$sweep_job" "${time_report[@]}" \
            "--output=$log_dir/%x-%j.out" "$here/report.sbatch" "$run_dir" --out "$report_out" \
            --job-table "$sweep_out/jobs.jsonl" "${report_args[@]}"
        report_job="$prev"
    fi
    array_argv=("${array_parallel[@]}")
    [ -z "$report_job" ] || array_argv+=(--report-job "$report_job")
    array_argv+=("$sweep_out/jobs.jsonl" "${site[@]}" "${time_adapt[@]}" "${adapt_res[@]}" -- "${adapt_args[@]}")
    if [ "$dry_run" -eq 1 ]; then
        echo "# then the sweep job <sweep> runs (N = rows of $sweep_out/jobs.jsonl, --array=0-\$((N-1))):"
        printf '#   TPDS_REPORT_DEPENDENCY=%q bash %q ' "$report_dep" "$here/submit_array.sh"
        printf '%q ' "${array_argv[@]}"
        printf '\n'
        printf 'scontrol release %q\n' "$sweep_job"
    else
        printf '%s\0' "${array_argv[@]}" >"$argv_file"
        scontrol release "$sweep_job" || die "could not release the held sweep job $sweep_job"
        echo "# the adapt array is submitted by the sweep job $sweep_job; its id will be in $sweep_out/adapt_array.jobid"
    fi
    prev=""
fi

if [ -n "$report_out" ] && [ -z "$grid" ]; then
    [ -n "$run_dir" ] || die "--report-out without --grid/--table: give the run dirs with --report-arg"
    deps=()
    if [ -n "$prev" ]; then deps=("--dependency=$report_dep:$prev")
    elif [ -n "$after" ]; then deps=("--dependency=afterok:$after"); fi
    table_args=()
    [ -z "$table" ] || table_args=(--job-table "$table")
    submit report sbatch "${common[@]}" "${deps[@]}" "${time_report[@]}" "--output=$log_dir/%x-%j.out" \
        "$here/report.sbatch" "$run_dir" --out "$report_out" "${table_args[@]}" "${report_args[@]}"
fi
