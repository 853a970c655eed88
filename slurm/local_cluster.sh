#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests (recipe: shared/notes/slurm-local.md).
#
#   bash slurm/local_cluster.sh start    # install if sbatch is missing, configure, start, wait for the node
#   bash slurm/local_cluster.sh status   # sinfo
#   bash slurm/local_cluster.sh stop     # stop the daemons this script started
#
# Run as root. `start` is idempotent: daemons already up are left alone, a changed slurm.conf restarts the
# SLURM daemons this script started. Environment: SLURM_START_TIMEOUT_S (default 90) bounds the wait for
# the node to become idle.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE_DIR=/run/radstream-slurm    # pid files of the daemons *this script* started (what `stop` may kill)
LOG_DIR=/var/log/slurm
MUNGE_LOG=/var/log/munge/munged.log
NODE=$(hostname -s)
START_TIMEOUT_S=${SLURM_START_TIMEOUT_S:-90}

die() { echo "local_cluster: $*" >&2; exit 1; }
log() { echo "local_cluster: $*"; }

# The pid in PIDFILE when it names a live process called NAME; nothing otherwise.
live_pid() {
    local name=$1 pidfile=$2 pid
    [[ -r $pidfile ]] || return 0
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/$pid/comm) == "$name" ]] && echo "$pid"
    return 0
}

install_packages() {
    command -v sbatch >/dev/null && return 0
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Lock::Timeout=300 slurm-wlm munge
}

# slurm.conf for this node. Beyond the recipe: addresses pinned to 127.0.0.1 (works where the hostname
# does not resolve), requeue settings, root jobs allowed, job records kept an hour and a completion log,
# since accounting is off.
render_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat <<CONF
# Written by slurm/local_cluster.sh; rewritten on every start.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=3600
JobRequeue=1
DisableRootJobs=NO
MpiDefault=none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

# Writes slurm.conf; returns 0 when its content changed.
write_conf() {
    local new
    new=$(render_conf)
    [[ -f $CONF && $(<"$CONF") == "$new" ]] && return 1
    printf '%s\n' "$new" >"$CONF"
}

start_munge() {
    mkdir -p /run/munge
    [[ -f /etc/munge/munge.key ]] || mungekey -c
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    if munge -n </dev/null >/dev/null 2>&1; then
        return 0
    fi
    log "starting munged"
    su -s /bin/sh munge -c munged
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    for _ in $(seq 50); do
        munge -n </dev/null >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    tail -n 20 "$MUNGE_LOG" >&2 || true
    die "munged did not come up"
}

# start_daemon NAME PIDFILE: start a SLURM daemon unless it runs; remember its pid as ours.
start_daemon() {
    local name=$1 pidfile=$2
    [[ -n $(live_pid "$name" "$pidfile") ]] && return 0
    log "starting $name"
    "$name" || { print_logs; die "$name failed to start"; }
    for _ in $(seq 50); do
        [[ -n $(live_pid "$name" "$pidfile") ]] && break
        sleep 0.1
    done
    [[ -n $(live_pid "$name" "$pidfile") ]] || { print_logs; die "$name exited right after starting"; }
    cp "$pidfile" "$STATE_DIR/$name.pid"
}

# stop_ours NAME: stop NAME if this script started it (TERM, then KILL after 10 s).
stop_ours() {
    local name=$1 pid
    pid=$(live_pid "$name" "$STATE_DIR/$name.pid")
    rm -f "$STATE_DIR/$name.pid"
    [[ -n $pid ]] || return 0
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

print_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$MUNGE_LOG"; do
        echo "---- last lines of $f" >&2
        tail -n 25 "$f" >&2 2>/dev/null || echo "(missing)" >&2
    done
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

# Waits until the node takes jobs (idle, or busy with jobs from an earlier start).
wait_for_node() {
    local deadline=$((SECONDS + START_TIMEOUT_S)) resumed=0 state
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) log "node $NODE is $state"; return 0 ;;
            down* | drain* | fail*)
                # ReturnToService=2 revives a node that registers; a drain left over from an old
                # configuration needs one explicit resume.
                if ((resumed == 0 && SECONDS > 5)); then
                    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
                    resumed=1
                fi ;;
        esac
        sleep 1
    done
    echo "local_cluster: node $NODE not idle after ${START_TIMEOUT_S}s (state: '${state:-no answer}')" >&2
    sinfo -N -l >&2 || true
    scontrol show node "$NODE" >&2 || true
    print_logs
    exit 1
}

cmd_start() {
    [[ $EUID -eq 0 ]] || die "run as root"
    install_packages
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" "$STATE_DIR"
    if write_conf; then
        log "wrote $CONF"
        stop_ours slurmd
        stop_ours slurmctld
    fi
    start_munge
    start_daemon slurmctld /run/slurmctld.pid
    start_daemon slurmd /run/slurmd.pid
    wait_for_node
    sinfo
}

cmd_stop() {
    stop_ours slurmd
    stop_ours slurmctld
    stop_ours munged
}

cmd_status() {
    command -v sinfo >/dev/null || die "SLURM is not installed"
    sinfo
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
