#!/usr/bin/env bash
# A real, local Slurm cluster on one machine for tests and CI: munged + slurmctld + two slurmd's
# (virtual nodes node1 and node2 on 127.0.0.1), no systemd, no cgroups, no accounting.
#
# Ports: `start` uses the first free slurmctld port from 16817 and the first free block of consecutive slurmd
# ports (one per node) from 17001, scanning up to 200 ports, so a second cluster, or another Slurm, on the
# same machine does not stop it from starting. A port is free when a TCP socket can bind it on all
# interfaces with SO_REUSEADDR, as the daemons bind. The choice is kept in STATE/ports: a restart reuses
# it while it is free. Starts on one machine are serialised by a lock in /tmp, so that two of them do not
# pick the same ports.
#
# Usage: bash scripts/slurm_local.sh {install|start|stop|status|env|clean}
#   install  apt-get install Debian's slurmctld, slurmd, slurm-client, munge and shellcheck (no-op when present)
#   start    create a munge key if missing, write slurm.conf, start munged, slurmctld and the slurmds,
#            wait until every node is idle (idempotent: a running cluster is only checked)
#   stop     cancel the cluster's jobs, stop the daemons this script started (by their pid files)
#   status   print daemon pids and `sinfo`; exit 0 only if every node is up
#   env      print `export SLURM_CONF=...` (eval "$(bash scripts/slurm_local.sh env)")
#   clean    stop, then delete the state directory
#
# Knobs (environment variables):
#   TPDS_SLURM_DIR         state directory (config, spool, logs, munge socket) [/tmp/tpds-slurm]
#   TPDS_SLURM_NODES       number of virtual nodes, 1..9 [2]
#   TPDS_SLURM_CPUS        CPUs declared per node [number of online CPUs, at least 2]
#   TPDS_SLURM_MEM_MB      RealMemory declared per node, in MB [4096]
#   TPDS_SLURM_CTLD_PORT   slurmctld port, used as given (start fails naming it if it is taken) [chosen]
#   TPDS_SLURM_NODE_PORT   port of node1, node k listens on NODE_PORT+k-1; used as given [chosen]
#   TPDS_SLURM_WAIT        seconds to wait for the nodes to become idle [90]
#   TPDS_SLURM_LINK_CONF   1: point /etc/slurm/slurm.conf at the generated file when that path is absent
#                          or already a symlink (so `sinfo` works without SLURM_CONF); 0: never [1]
#
# Everything listens on loopback only. Clients find the cluster through SLURM_CONF (see `env`) or the
# /etc/slurm/slurm.conf symlink. Daemons run as the invoking user (SlurmUser = SlurmdUser = that user);
# jobs can then only run as that user.
set -euo pipefail

state="${TPDS_SLURM_DIR:-/tmp/tpds-slurm}"
nodes="${TPDS_SLURM_NODES:-2}"
ncpu_default="$(nproc 2>/dev/null || echo 2)"
if [ "$ncpu_default" -lt 2 ]; then ncpu_default=2; fi
cpus="${TPDS_SLURM_CPUS:-$ncpu_default}"
mem_mb="${TPDS_SLURM_MEM_MB:-4096}"
ctld_port=""   # set by choose_ports / saved_ports
node_port=""
port_scan=200
wait_s="${TPDS_SLURM_WAIT:-90}"
link_conf="${TPDS_SLURM_LINK_CONF:-1}"
cluster="tpds"
conf="$state/slurm.conf"
munge_dir="$state/munge"
munge_socket="$munge_dir/munge.socket.2"
slurm_user="$(id -un)"

log() { printf 'slurm_local: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$nodes" in [1-9]) ;; *) die "TPDS_SLURM_NODES must be 1..9, got '$nodes'" ;; esac
case "$state" in /*) ;; *) die "TPDS_SLURM_DIR must be an absolute path, got '$state'" ;; esac

node_names() {
    local i
    for ((i = 1; i <= nodes; i++)); do printf 'node%d\n' "$i"; done
}

pid_alive() {  # pid_alive PIDFILE: true if the file names a live process
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) for: $*"
    fi
}

cmd_install() {
    if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 \
        && command -v shellcheck >/dev/null 2>&1; then
        log "install: already installed ($(slurmd -V 2>/dev/null || echo slurmd))"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "install: apt-get not found (Debian/Ubuntu only); install Slurm and munge yourself"
    # refresh the package lists only when they do not know the packages yet
    if ! apt-cache show slurmd >/dev/null 2>&1; then
        as_root apt-get update -q
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge shellcheck
    log "install: ok ($(slurmd -V))"
}

ports_busy() {  # ports_busy PORT...: print the ports that a TCP socket cannot bind on all interfaces
    # SO_REUSEADDR as the daemons set it: a listener makes the port busy, connections in TIME_WAIT left by
    # a stopped cluster do not (else every restart would move to new ports)
    python3 - "$@" <<'EOF'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except OSError:
            print(port)
EOF
}

saved_ports() {  # read STATE/ports into ctld_port / node_port; false when there is none
    [ -s "$state/ports" ] || return 1
    ctld_port="$(sed -n 's/^ctld_port=\([0-9][0-9]*\)$/\1/p' "$state/ports")"
    node_port="$(sed -n 's/^node_port=\([0-9][0-9]*\)$/\1/p' "$state/ports")"
    [ -n "$ctld_port" ] && [ -n "$node_port" ]
}

pick_block() {  # pick_block VAR GIVEN FIRST COUNT WHAT [SKIP]: print the first of COUNT consecutive free ports.
    # GIVEN (the environment variable VAR's value) is used as given and fails naming VAR if a port is taken;
    # otherwise the first free block from FIRST within port_scan ports, skipping any block that holds port SKIP
    local var="$1" given="$2" first="$3" count="$4" what="$5" skip="${6:-}" busy p
    if [ -n "$given" ]; then
        # shellcheck disable=SC2046
        busy="$(ports_busy $(seq "$given" $((given + count - 1))))"
        [ -z "$busy" ] || die "start: $var=$given is in use (${what} port(s) ${busy//$'\n'/ }); unset it to pick free ports"
        echo "$given"
        return
    fi
    for ((p = first; p < first + port_scan; p++)); do
        if [ -n "$skip" ] && [ "$p" -le "$skip" ] && [ "$skip" -le $((p + count - 1)) ]; then continue; fi
        # shellcheck disable=SC2046
        if [ -z "$(ports_busy $(seq "$p" $((p + count - 1))))" ]; then echo "$p"; return; fi
    done
    die "start: no $count free consecutive $what port(s) in $first-$((first + port_scan - 1))"
}

choose_ports() {  # set ctld_port / node_port: the environment's as given, else free ones; save them
    local want_ctld=16817 want_node=17001
    if saved_ports; then want_ctld="$ctld_port"; want_node="$node_port"; fi
    # die inside $(...) ends only the subshell: `|| exit 1` ends the script (its message is already out)
    ctld_port="$(pick_block TPDS_SLURM_CTLD_PORT "${TPDS_SLURM_CTLD_PORT:-}" "$want_ctld" 1 slurmctld)" || exit 1
    node_port="$(pick_block TPDS_SLURM_NODE_PORT "${TPDS_SLURM_NODE_PORT:-}" "$want_node" "$nodes" slurmd \
        "$ctld_port")" || exit 1
    printf 'ctld_port=%s\nnode_port=%s\n' "$ctld_port" "$node_port" >"$state/ports.tmp.$$"
    mv -f "$state/ports.tmp.$$" "$state/ports"
}

render_conf() {  # render_conf FILE
    local node_line
    node_line="NodeName=node[1-$nodes] NodeAddr=127.0.0.1 NodeHostname=localhost Port=$node_port-$((node_port + nodes - 1))"
    if [ "$nodes" -eq 1 ]; then
        node_line="NodeName=node1 NodeAddr=127.0.0.1 NodeHostname=localhost Port=$node_port"
    fi
    cat >"$1" <<EOF
# Generated by scripts/slurm_local.sh; rewritten by every 'start'. Local test cluster only.
ClusterName=$cluster
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=$slurm_user
SlurmdUser=$slurm_user
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued batch job (default 120 s); 10 s keeps tests fast
AuthInfo=socket=$munge_socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# the node definitions are authoritative (two virtual nodes share one machine)
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MaxArraySize=100001
MaxJobCount=100000
MinJobAge=600
KillWait=10
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
$node_line CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

write_conf() {
    local i tmp="$conf.tmp.$$"
    mkdir -p "$state/ctld" "$state/spool" "$state/log" "$state/run"
    render_conf "$tmp"
    mv -f "$tmp" "$conf"
    if [ "$link_conf" = "1" ]; then
        local etc=/etc/slurm/slurm.conf
        if [ ! -e "$etc" ] || [ -L "$etc" ]; then
            if [ -w /etc/slurm ] || [ -w "$(dirname /etc/slurm)" ]; then
                mkdir -p /etc/slurm
                ln -sfn "$conf" "$etc"
            fi
        fi
    fi
    for i in $(node_names); do mkdir -p "$state/spool/$i"; done
}

start_munge() {
    mkdir -p "$munge_dir"
    chmod 0755 "$munge_dir"  # munged requires the socket directory to be searchable by all
    if [ ! -s "$munge_dir/munge.key" ]; then
        log "start: creating munge key $munge_dir/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$munge_dir/munge.key" --force
        else
            dd if=/dev/urandom of="$munge_dir/munge.key" bs=1 count=1024 status=none
        fi
        chmod 0600 "$munge_dir/munge.key"
    fi
    if pid_alive "$munge_dir/munged.pid" && munge -n -S "$munge_socket" >/dev/null 2>&1; then
        return 0
    fi
    rm -f "$munge_socket" "$munge_socket.lock"
    munged 9>&- --socket="$munge_socket" --key-file="$munge_dir/munge.key" --pid-file="$munge_dir/munged.pid" \
        --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" \
        || die "munged failed to start (it needs every directory above $munge_dir to be searchable by all users); see $munge_dir/munged.log"
    local t=0
    until munge -n -S "$munge_socket" | unmunge -S "$munge_socket" >/dev/null 2>&1; do
        t=$((t + 1))
        [ "$t" -le 50 ] || die "munged does not answer on $munge_socket; see $munge_dir/munged.log"
        sleep 0.1
    done
}

nodes_ready() {  # true when every node is in a usable state (idle, mixed, allocated, completing)
    local out n_ok
    out="$(SLURM_CONF="$conf" sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
    n_ok="$(printf '%s\n' "$out" | awk '$2 ~ /^(idle|mix|alloc|comp)$/ {n++} END {print n + 0}')"
    [ "$n_ok" -eq "$nodes" ]
}

cmd_start() {
    command -v slurmctld >/dev/null 2>&1 || die "start: Slurm is not installed; run: bash scripts/slurm_local.sh install"
    mkdir -p "$state"
    # one start at a time on this machine: ports are chosen free, then bound by the daemons
    # (fd 9, closed for the daemons: they would otherwise hold it for their lifetime)
    local lockf="${TMPDIR:-/tmp}/tpds-slurm-ports.lock"
    if touch "$lockf" 2>/dev/null; then exec 9>>"$lockf"; flock 9; else log "start: cannot write $lockf; no port lock"; fi
    local all_up=1 i
    pid_alive "$state/run/slurmctld.pid" || all_up=0
    for i in $(node_names); do pid_alive "$state/run/slurmd-$i.pid" || all_up=0; done
    if [ "$all_up" -eq 1 ] && [ -f "$conf" ] && saved_ports; then
        # the running daemons hold the saved ports; an explicit port that differs is a configuration change
        ctld_port="${TPDS_SLURM_CTLD_PORT:-$ctld_port}"
        node_port="${TPDS_SLURM_NODE_PORT:-$node_port}"
        local want="$state/slurm.conf.want.$$" same=0
        render_conf "$want"
        if cmp -s "$want" "$conf"; then same=1; fi
        rm -f "$want"
        if [ "$same" -eq 1 ] && nodes_ready; then
            log "start: already running ($nodes nodes up); export SLURM_CONF=$conf"
            return 0
        fi
        if [ "$same" -eq 0 ]; then
            log "start: configuration changed; restarting the daemons"
            cmd_stop
        fi
    fi
    local any_up=0
    pid_alive "$state/run/slurmctld.pid" && any_up=1
    for i in $(node_names); do pid_alive "$state/run/slurmd-$i.pid" && any_up=1; done
    if [ "$any_up" -eq 1 ] && saved_ports; then   # some daemons survive: they hold the saved ports
        ctld_port="${TPDS_SLURM_CTLD_PORT:-$ctld_port}"
        node_port="${TPDS_SLURM_NODE_PORT:-$node_port}"
    else
        choose_ports
    fi
    start_munge
    write_conf
    export SLURM_CONF="$conf"
    if ! pid_alive "$state/run/slurmctld.pid"; then
        slurmctld -f "$conf" 9>&- || die "slurmctld failed to start; see $state/log/slurmctld.log"
    fi
    for i in $(node_names); do
        if ! pid_alive "$state/run/slurmd-$i.pid"; then
            slurmd -f "$conf" -N "$i" 9>&- || die "slurmd -N $i failed to start; see $state/log/slurmd-$i.log"
        fi
    done
    local t0 now
    t0="$(date +%s)"
    until nodes_ready; do
        now="$(date +%s)"
        if [ $((now - t0)) -ge "$wait_s" ]; then
            log "start: nodes not idle after ${wait_s}s; sinfo says:"
            sinfo -N -o '%N %t %E' >&2 || true
            log "last lines of the logs:"
            tail -n 5 "$state/log/"*.log >&2 || true
            die "start: cluster did not come up (state dir $state)"
        fi
        # nodes that came back after an unclean stop may be DOWN; resume them
        scontrol update NodeName="node[1-$nodes]" State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    exec 9>&-
    log "start: $nodes node(s) idle after $(($(date +%s) - t0))s (slurmctld port $ctld_port, slurmd $node_port-$((node_port + nodes - 1))); export SLURM_CONF=$conf"
}

stop_pidfiles() {  # stop_pidfiles PIDFILE...: SIGTERM all at once, wait up to 15 s, then SIGKILL
    local f pid t=0
    local -a pids=()
    for f in "$@"; do
        if pid_alive "$f"; then
            pid="$(cat "$f")"
            pids+=("$pid")
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            t=$((t + 1))
            if [ "$t" -gt 150 ]; then
                log "stop: pid $pid ignores SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
    rm -f "$@"
}

cmd_stop() {
    local i t=0
    local -a ids=()
    if pid_alive "$state/run/slurmctld.pid"; then
        mapfile -t ids < <(SLURM_CONF="$conf" squeue -h -o '%A' 2>/dev/null || true)
        if [ "${#ids[@]}" -gt 0 ]; then
            log "stop: cancelling jobs: ${ids[*]}"
            SLURM_CONF="$conf" scancel --full "${ids[@]}" 2>/dev/null || true
            while [ -n "$(SLURM_CONF="$conf" squeue -h -o '%A' 2>/dev/null || true)" ] && [ "$t" -lt 30 ]; do
                t=$((t + 1))
                sleep 0.5
            done
        fi
    fi
    local -a files=("$state/run/slurmctld.pid")
    for i in $(node_names); do files+=("$state/run/slurmd-$i.pid"); done
    stop_pidfiles "${files[@]}"
    stop_pidfiles "$munge_dir/munged.pid"   # last: the others talk to it while shutting down
    log "stop: stopped"
}

cmd_status() {
    local i rc=0
    for f in "$munge_dir/munged.pid" "$state/run/slurmctld.pid"; do
        if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): stopped"; rc=1; fi
    done
    for i in $(node_names); do
        if pid_alive "$state/run/slurmd-$i.pid"; then echo "slurmd $i: running (pid $(cat "$state/run/slurmd-$i.pid"))"; else echo "slurmd $i: stopped"; rc=1; fi
    done
    echo "SLURM_CONF=$conf"
    if pid_alive "$state/run/slurmctld.pid"; then   # sinfo without a controller retries for many seconds
        SLURM_CONF="$conf" sinfo -N -o '%N %P %t %c %E' 2>/dev/null || rc=1
        nodes_ready || rc=1
    fi
    return "$rc"
}

cmd_clean() {
    cmd_stop
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$conf" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
    rm -rf -- "$state"
    log "clean: removed $state"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) printf 'export SLURM_CONF=%q\n' "$conf" ;;
    clean) cmd_clean ;;
    *) echo "usage: $0 {install|start|stop|status|env|clean}" >&2; exit 2 ;;
esac
