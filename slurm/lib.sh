# shellcheck shell=bash
# Helpers shared by the sbatch scripts in slurm/. Sourced, never executed.
#
# Knobs read here (all optional; documented in docs/slurm.md):
#   TPDS_ENV_FILE          a bash file sourced first in every job (module loads, venv activation, exports)
#   TPDS_CMD               the command line prefix of the CLI [tensorpoly-ds]
#   TPDS_<STAGE>_CMD       full prefix for one stage, e.g. TPDS_ADAPT_CMD="python my_fake_adapt.py"
#                          (STAGE = PREP, PRETRAIN, SWEEP, ADAPT, REPORT; default "$TPDS_CMD <stage>")
#   TPDS_MASTER_PORT       fixed rendezvous port (default: derived from the job id / array id)
#   TPDS_TORCH_EXT_ROOT    parent of the per-job TORCH_EXTENSIONS_DIR [${TMPDIR:-/tmp}/tpds-torch-ext-$USER]
#   TPDS_TORCH_EXT_SEED    a directory of already built torch extensions (e.g. one job's TORCH_EXTENSIONS_DIR)
#                          copied into each new per-job directory, so jobs do not rebuild (no shared lock)
# Command prefixes are split on whitespace (no quotes, no globbing, no eval): a path with spaces
# cannot be a prefix; wrap it in a small script instead.

tpds_log() { printf '[tpds-slurm %s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }
tpds_die() { tpds_log "error: $*"; exit 2; }

# Source the user's environment file. Module systems and venv scripts are often not `set -u` clean.
tpds_source_env() {
    if [ -n "${TPDS_ENV_FILE:-}" ]; then
        [ -r "$TPDS_ENV_FILE" ] || tpds_die "TPDS_ENV_FILE=$TPDS_ENV_FILE is not readable"
        set +u
        # shellcheck disable=SC1090
        source "$TPDS_ENV_FILE"
        set -u
    fi
}

# tpds_stage_cmd STAGE: fill the global array TPDS_STAGE_ARGV with the command prefix of STAGE.
tpds_stage_cmd() {
    local stage="$1" var
    var="TPDS_$(printf '%s' "$stage" | tr '[:lower:]' '[:upper:]')_CMD"
    TPDS_STAGE_ARGV=()
    if [ -n "${!var:-}" ]; then
        read -r -a TPDS_STAGE_ARGV <<<"${!var}"
    else
        read -r -a TPDS_STAGE_ARGV <<<"${TPDS_CMD:-tensorpoly-ds}"
        TPDS_STAGE_ARGV+=("$stage")
    fi
    [ "${#TPDS_STAGE_ARGV[@]}" -gt 0 ] || tpds_die "$var is empty"
}

# A port in [20000, 40000) from the job id, or, for array tasks, from the array job id and the task id
# (distinct for every task of one array: the task id is added, not hashed).
tpds_port() {
    local key
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        key=$((SLURM_ARRAY_JOB_ID * 1009 + SLURM_ARRAY_TASK_ID))
    else
        key=$((${SLURM_JOB_ID:-0} * 1009))
    fi
    printf '%d\n' $((20000 + key % 20000))
}

# The address of the first node of the allocation: its NodeAddr (what slurmd listens on), else its name.
tpds_master_addr() {
    local first addr
    first="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)"
    addr="$(scontrol -o show node "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)"
    printf '%s\n' "${addr:-$first}"
}

# Per-job (per array task) torch extensions directory: concurrent jobs on one node must not share the
# build lock (REFERENCE pitfall 9). Node-local by default.
tpds_torch_ext_dir() {
    local root="${TPDS_TORCH_EXT_ROOT:-${TMPDIR:-/tmp}/tpds-torch-ext-${USER:-$(id -un)}}" leaf
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        leaf="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        leaf="${SLURM_JOB_ID:-local-$$}"
    fi
    printf '%s/%s\n' "$root" "$leaf"
}

# Export TORCH_EXTENSIONS_DIR (per job / array task) and create it on this node, seeded from
# TPDS_TORCH_EXT_SEED when that is set and the directory is new. The copy goes to a temporary directory
# renamed into place, so ranks of one node racing here never see a half-copied directory. Build locks
# are not copied (a stale lock is what makes a JIT build wait forever).
tpds_prepare_torch_ext() {
    local tmp
    TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR_FOR_JOB:-$(tpds_torch_ext_dir)}"
    export TORCH_EXTENSIONS_DIR
    if [ -d "$TORCH_EXTENSIONS_DIR" ]; then   # a restart of this job (or a leftover): keep it unless empty
        [ -z "$(ls -A "$TORCH_EXTENSIONS_DIR")" ] || return 0
        rmdir "$TORCH_EXTENSIONS_DIR" 2>/dev/null || true
    fi
    mkdir -p "$(dirname "$TORCH_EXTENSIONS_DIR")"
    if [ -n "${TPDS_TORCH_EXT_SEED:-}" ] && [ -d "$TPDS_TORCH_EXT_SEED" ]; then
        tmp="$TORCH_EXTENSIONS_DIR.tmp.$$"
        rm -rf "$tmp"
        mkdir -p "$tmp"
        # timestamps must survive the copy: ninja rebuilds outputs newer than its recorded deps
        cp -R -p "$TPDS_TORCH_EXT_SEED/." "$tmp/" 2>/dev/null || cp -R --preserve=timestamps,mode "$TPDS_TORCH_EXT_SEED/." "$tmp/"
        find "$tmp" -name lock -type f -delete
        mv -T "$tmp" "$TORCH_EXTENSIONS_DIR" 2>/dev/null || rm -rf "$tmp"   # another rank was first
    else
        [ -z "${TPDS_TORCH_EXT_SEED:-}" ] || tpds_log "warning: TPDS_TORCH_EXT_SEED=$TPDS_TORCH_EXT_SEED is not a directory"
        mkdir -p "$TORCH_EXTENSIONS_DIR"
    fi
}

tpds_banner() {
    tpds_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID})} '${SLURM_JOB_NAME:-?}' on $(hostname) nodes=${SLURM_JOB_NODELIST:-?} restarts=${SLURM_RESTART_COUNT:-0}"
}

# Threads per process: one per allocated CPU of the task unless the user chose.
tpds_threads() {
    if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"
    fi
}

# tpds_run_requeueable CMD [ARGS...]: run CMD (srun ... or one process) in the background and requeue this
# job when it exits 124 ("checkpointed, requeue me").
# Slurm's --signal=B:USR1@T signals this batch shell only: the trap forwards SIGUSR1 to CMD (srun delivers it
# to every task; a single process gets it directly). On exit 124 the job is requeued (`scontrol requeue`,
# same job id, --open-mode=append log) and this function exits 0; TPDS_MAX_REQUEUES (default 20) bounds the
# loop. If CMD died of the forwarded SIGUSR1 (128+10: a signal before its handler was installed), the job
# is requeued too: it resumes from its last checkpoint. Any other status is returned as the job's.
tpds_run_requeueable() {
    local rc restarts
    tpds_child_pid=""
    tpds_got_usr1=0
    trap tpds_forward_usr1 USR1
    "$@" &
    tpds_child_pid=$!
    # A signal received before CMD started is forwarded once it could get it.
    if [ "$tpds_got_usr1" -eq 1 ]; then sleep 2; tpds_forward_usr1; fi
    # `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until CMD is gone,
    # then once more for its real exit status (bash keeps it for a reaped background job).
    while kill -0 "$tpds_child_pid" 2>/dev/null; do
        wait "$tpds_child_pid" || true
    done
    set +e
    wait "$tpds_child_pid"
    rc=$?
    set -e
    trap - USR1
    tpds_log "$1 exited with status $rc (SIGUSR1 received: $tpds_got_usr1)"
    if [ "$rc" -eq $((128 + 10)) ] && [ "$tpds_got_usr1" -eq 1 ]; then
        tpds_log "the tasks were killed by SIGUSR1 before handling it (no new checkpoint); requeuing anyway"
        rc=124
    fi
    if [ "$rc" -eq 124 ]; then
        restarts="${SLURM_RESTART_COUNT:-0}"
        if [ "$restarts" -ge "${TPDS_MAX_REQUEUES:-20}" ]; then
            tpds_log "checkpointed, but this job was already requeued $restarts times (TPDS_MAX_REQUEUES); not requeuing"
            exit 124
        fi
        tpds_log "checkpointed: requeuing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        tpds_log "scontrol requeue failed (is the job requeueable? JobRequeue/--requeue); resubmit the same command by hand"
        exit 124
    fi
    exit "$rc"
}

tpds_forward_usr1() {
    tpds_got_usr1=1
    if [ -n "${tpds_child_pid:-}" ] && kill -0 "$tpds_child_pid" 2>/dev/null; then
        tpds_log "SIGUSR1: forwarding to pid $tpds_child_pid"
        kill -USR1 "$tpds_child_pid" 2>/dev/null || true
    fi
}

