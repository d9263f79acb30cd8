#!/usr/bin/env bash
# A single-node SLURM cluster for CI and tests: `.ci/slurm.sh start|stop|status`.
#
# start   installs Debian's slurm-wlm and munge if missing (idempotent), writes the munge key and
#         /etc/slurm/slurm.conf, starts munged, slurmctld and slurmd, waits until the node is idle
#         and records the PIDs of the daemons it started in $STATE_DIR/pids.
# stop    kills exactly the PIDs recorded by start (nothing found by name), then removes the record.
# status  exits 0 when the recorded daemons are alive and `sinfo` answers.
#
# Needs root (daemons run as root, as SlurmUser=root). The config lives at /etc/slurm/slurm.conf
# because the slurm job-step executor drops SLURM_CONF from the job environment.
set -euo pipefail

STATE_DIR=${BRAINVQ_SLURM_STATE:-/var/tmp/brainvq-slurm}
PID_FILE="$STATE_DIR/pids"
CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
PARTITION=${BRAINVQ_SLURM_PARTITION:-debug}
WAIT_S=${BRAINVQ_SLURM_WAIT_S:-60}
CONF_MARK="Written by brainvq .ci/slurm.sh"

log() { echo "slurm.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons as root)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and apt-get is not available"
    log "installing slurm-wlm and munge with apt-get"
    # Package postinst scripts must not start daemons we would not know the PIDs of.
    local policy_made=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_made=1
    fi
    local rc=0
    {
        apt-get -o DPkg::Lock::Timeout=900 update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
                slurm-wlm munge >/dev/null
    } || rc=$?
    [[ $policy_made -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc -eq 0 ]] || die "apt-get install slurm-wlm munge failed (exit $rc)"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# Print the PID in a daemon's pid file when that process is alive and has the expected name.
alive_pid() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$name" ]] || return 1
    echo "$pid"
}

start_munge() {
    if munge_works; then
        log "munged already answers; using it (not recorded, so stop leaves it alone)"
        return
    fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    # munged daemonises and writes its pid file; stdio closed so callers' pipes never hang.
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >/dev/null 2>&1 ||
        die "munged failed to start; see /var/log/munge/munged.log"
    local pid
    for _ in $(seq 50); do
        pid=$(alive_pid /run/munge/munged.pid munged) && munge_works && break
        sleep 0.2
    done
    munge_works || die "munged does not answer; see /var/log/munge/munged.log"
    echo "munged $pid" >>"$PID_FILE"
}

write_conf() {
    local host node_line
    # Never overwrite a real cluster's configuration.
    if [[ -e $CONF ]] && ! grep -q "^# $CONF_MARK" "$CONF" && [[ ${BRAINVQ_SLURM_FORCE:-0} != 1 ]]; then
        die "$CONF exists and was not written by this script; set BRAINVQ_SLURM_FORCE=1 to replace it"
    fi
    host=$(hostname -s)
    # The node's real CPUs/sockets/memory, as slurmd itself detects them.
    node_line=$(slurmd -C | head -n 1)
    [[ $node_line == NodeName=* ]] || die "slurmd -C gave no node line: $node_line"
    install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
    cat >"$CONF" <<EOF
# $CONF_MARK: a single-node test cluster, everything runs as root.
ClusterName=brainvq
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# snakemake's squeue status query needs finished jobs listed for a while (>= 3x its poll interval).
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
$node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {
    local name=$1 pidfile=$2 pid
    shift 2
    # -c: start clean (no saved jobs from an earlier cluster). Daemons fork; stdio closed.
    "$name" "$@" </dev/null >/dev/null 2>&1 || die "$name failed to start; see /var/log/slurm/$name.log"
    for _ in $(seq 50); do
        pid=$(alive_pid "$pidfile" "$name") && break
        sleep 0.2
    done
    [[ -n ${pid:-} ]] || die "$name did not stay up; see /var/log/slurm/$name.log"
    echo "$name $pid" >>"$PID_FILE"
}

node_idle() { [[ $(sinfo -h -N -o '%T' 2>/dev/null | head -n 1) == idle* ]]; }

is_running() {
    [[ -s $PID_FILE ]] || return 1
    local name pid
    while read -r name pid; do
        [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$name" ]] || return 1
    done <"$PID_FILE"
    sinfo -h >/dev/null 2>&1
}

cmd_start() {
    require_root
    if is_running; then
        log "already running (PIDs in $PID_FILE)"
        return
    fi
    [[ -s $PID_FILE ]] && cmd_stop
    install_packages
    install -d -m 0755 "$STATE_DIR"
    : >"$PID_FILE"
    start_munge
    write_conf
    start_daemon slurmctld /run/slurm/slurmctld.pid -c
    start_daemon slurmd /run/slurm/slurmd.pid -c
    local waited=0
    until node_idle; do
        ((waited++ < WAIT_S)) || {
            sinfo -N -l >&2 || true
            die "node not idle after ${WAIT_S}s; see /var/log/slurm/"
        }
        sleep 1
    done
    log "running: $(sinfo -h -N -o '%N %T %c CPUs %m MB partition %P')"
}

cmd_stop() {
    [[ -s $PID_FILE ]] || {
        log "nothing recorded in $PID_FILE"
        return
    }
    local name pid
    # Reverse start order: slurmd, slurmctld, then munged.
    tac "$PID_FILE" | while read -r name pid; do
        if [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$name" ]]; then
            kill "$pid" || true
            for _ in $(seq 50); do
                [[ -e /proc/$pid ]] || break
                sleep 0.2
            done
            if [[ -e /proc/$pid ]]; then
                kill -9 "$pid" 2>/dev/null || true
            fi
            log "stopped $name ($pid)"
        fi
    done
    rm -f "$PID_FILE"
}

cmd_status() {
    is_running && sinfo -N -l
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
