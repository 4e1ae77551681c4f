#!/usr/bin/env bash
# A real single-node SLURM on localhost with 2 fake GPUs, for tests and CI-sized runs.
#
#   slurm/local-cluster.sh start    install slurm-wlm + munge if missing, write /etc/slurm/*.conf,
#                                   start munged, slurmctld and slurmd; wait until the node is idle
#   slurm/local-cluster.sh stop     cancel every job, stop the daemons (by PID) and wait for them
#   slurm/local-cluster.sh status   sinfo + squeue, or "not running" (exit 1)
#
# Needs root. State (spool, logs, PID files) lives under $CIRRUS_SLURM_DIR (default /var/tmp/cirrus-slurm).
# Fake GPUs are gres.conf File= lines on /dev/null and /dev/zero: SLURM schedules them and sets
# CUDA_VISIBLE_DEVICES, but there is no real device. Recipe and gotchas: docs/slurm.md.
set -euo pipefail

SLURM_DIR=${CIRRUS_SLURM_DIR:-/var/tmp/cirrus-slurm}
START_TIMEOUT=${CIRRUS_SLURM_START_TIMEOUT:-60}
NODE=$(hostname -s)
CONF_DIR=/etc/slurm

die() { echo "local-cluster: error: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

pid_alive() {  # pid_alive FILE: the PID in FILE names a live process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

running() {
    pid_alive "$SLURM_DIR/slurmctld.pid" && pid_alive "$SLURM_DIR/slurmd.pid"
}

node_state() {
    sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true
}

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] || die "slurmctld is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "slurmctld is not installed and there is no apt-get to install it"
    say "installing slurm-wlm and munge (apt-get)"
    mkdir -p "$SLURM_DIR"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurm-wlm munge; } >"$SLURM_DIR/apt-install.log" 2>&1; then
        tail -n 20 "$SLURM_DIR/apt-install.log" >&2
        die "apt-get install slurm-wlm munge failed (log: $SLURM_DIR/apt-install.log)"
    fi
}

write_config() {
    local cpus mem proctrack taskplugin
    cpus=$(nproc)
    mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    if [[ -d /sys/fs/cgroup/memory && -d /sys/fs/cgroup/freezer && -d /sys/fs/cgroup/cpuset ]]; then
        proctrack=proctrack/cgroup taskplugin=task/cgroup
        cat >"$CONF_DIR/cgroup.conf" <<EOF
# written by cirrus slurm/local-cluster.sh (cgroup v1)
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainDevices=no
EOF
    else  # no writable cgroup v1 hierarchies (e.g. a container): jobs run, --mem is bookkeeping only
        proctrack=proctrack/linuxproc taskplugin=task/none
        rm -f "$CONF_DIR/cgroup.conf"
    fi
    cat >"$CONF_DIR/slurm.conf" <<EOF
# written by cirrus slurm/local-cluster.sh: single node, 2 fake GPUs
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_DIR/spool/ctld
SlurmdSpoolDir=$SLURM_DIR/spool/d
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=$proctrack
TaskPlugin=$taskplugin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MessageTimeout=10
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=60
KillWait=5
Waittime=0
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/gres.conf" <<EOF
# written by cirrus slurm/local-cluster.sh: fake GPUs need character devices (File=), not Count=
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
NodeName=$NODE Name=gpu File=/dev/zero
EOF
}

start_munge() {
    if [[ -s /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        :
    else
        mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
        [[ -s /etc/munge/munge.key ]] || mungekey --create --force
        runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    cp /run/munge/munged.pid "$SLURM_DIR/munged.pid" 2>/dev/null || true
    munge -n | unmunge >/dev/null || die "munge does not work (munge -n | unmunge failed)"
}

cmd_start() {
    if running && [[ $(node_state) =~ ^(idle|mixed|allocated) ]]; then
        say "already running (node $NODE $(node_state); state in $SLURM_DIR)"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "starting SLURM needs root (the daemons run as root)"
    local t0=$SECONDS
    install_packages
    stop_daemons quiet  # half-started leftovers
    mkdir -p "$SLURM_DIR/spool/ctld" "$SLURM_DIR/spool/d" "$SLURM_DIR/log" "$CONF_DIR"
    write_config
    start_munge
    slurmctld -c || die "slurmctld did not start (log: $SLURM_DIR/log/slurmctld.log)"
    slurmd || die "slurmd did not start (log: $SLURM_DIR/log/slurmd.log)"
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while :; do
        state=$(node_state)
        [[ $state == idle ]] && break
        if [[ $state =~ ^(drain|drained|down|inval) ]]; then
            scontrol update nodename="$NODE" state=resume 2>/dev/null || true
        fi
        if ((SECONDS >= deadline)); then
            tail -n 5 "$SLURM_DIR/log/slurmctld.log" "$SLURM_DIR/log/slurmd.log" >&2 || true
            die "node $NODE not idle after ${START_TIMEOUT} s (state: ${state:-unknown}); logs in $SLURM_DIR/log"
        fi
        sleep 0.2
    done
    say "running: node $NODE idle, $(nproc) CPUs, 2 fake GPUs, partition debug ($((SECONDS - t0)) s; state in $SLURM_DIR)"
}

wait_gone() {  # wait_gone PID: up to 15 s, then SIGKILL
    local pid=$1 i
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop_daemons() {  # slurmd and slurmctld together, then munged; each by its recorded PID
    local quiet=${1:-} name file pid group
    for group in "slurmd slurmctld" "munged"; do
        local -a pids=() names=()
        for name in $group; do
            file=$SLURM_DIR/$name.pid
            [[ $name == munged && ! -s $file ]] && file=/run/munge/munged.pid
            if [[ -s $file ]] && pid=$(cat "$file") && kill -0 "$pid" 2>/dev/null; then
                kill "$pid" 2>/dev/null || true
                pids+=("$pid") names+=("$name($pid)")
            fi
            rm -f "$SLURM_DIR/$name.pid"
        done
        for pid in "${pids[@]}"; do wait_gone "$pid"; done
        [[ -n $quiet || ${#names[@]} -eq 0 ]] || say "stopped ${names[*]}"
    done
}

cmd_stop() {
    if running; then
        scancel --user=root 2>/dev/null || true
        scancel $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        local i
        for i in $(seq 100); do  # let slurmd finish the cancelled jobs
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    stop_daemons
    rmdir /sys/fs/cgroup/{memory,cpuset,freezer,devices}/slurm_"$NODE" 2>/dev/null || true
    say "stopped"
}

cmd_status() {
    if ! running; then
        echo "not running"
        return 1
    fi
    sinfo
    echo
    squeue -o "%.8i %.12j %.9T %.10M %.20R %.14b %.8m %.4C"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
