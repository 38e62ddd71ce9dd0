#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine, for tests (tests/test_slurm.py) and for
# trying `hydra/launcher=slurm` or scripts/submit_slurm.sh without a real cluster.
#
#   scripts/slurm/local_cluster.sh install   # apt-get install slurm-wlm munge (skipped if present; needs root)
#   scripts/slurm/local_cluster.sh start     # write the config, start munged, slurmctld, slurmd; wait for an idle node
#   scripts/slurm/local_cluster.sh status    # sinfo + squeue; exit 1 if the cluster is not up
#   scripts/slurm/local_cluster.sh stop      # cancel its jobs, stop the three daemons; nothing is left running
#   scripts/slurm/local_cluster.sh clean     # stop, then remove the state dir
#   scripts/slurm/local_cluster.sh env       # print `export SLURM_CONF=...` (eval it to use the cluster)
#
# Everything (config, munge key and socket, spool, state, logs, pid files) lives in one directory,
# $SLM_SLURM_DIR (default /tmp/slm-slurm); nothing under /etc is changed. Every command is
# idempotent. The SLURM client commands find the cluster through SLURM_CONF:
#
#   eval "$(scripts/slurm/local_cluster.sh env)"; sinfo
#
# The config suits a container: one node named after `hostname -s` at 127.0.0.1, CPUs from nproc,
# RealMemory a little below MemTotal, proctrack/linuxproc and task/none (no cgroups), no
# accounting database (so `sacct` does not work), and JobRequeue=1, KillWait=5, cred_expire=5 and
# sched_interval=2 so that a requeued job starts again within about 6 s (SLURM's default: 2 min).
# Finished jobs stay in `squeue -t all` for 10 min. Ports: SLM_SLURM_CTLD_PORT (6817) and
# SLM_SLURM_D_PORT (6818). Time limit for the node to come up: SLM_SLURM_START_TIMEOUT s (60).
# apt-get's output goes to $SLM_SLURM_DIR/log/apt.log, the daemons' logs to $SLM_SLURM_DIR/log/.
set -euo pipefail

DIR=${SLM_SLURM_DIR:-/tmp/slm-slurm}
CTLD_PORT=${SLM_SLURM_CTLD_PORT:-6817}
D_PORT=${SLM_SLURM_D_PORT:-6818}
START_TIMEOUT=${SLM_SLURM_START_TIMEOUT:-60}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_of() {  # the live pid recorded in $DIR/run/$1.pid, or nothing
    local f=$DIR/run/$1.pid pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid"; then echo "$pid"; fi
}

is_alive() {  # a running process, not a zombie
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

have_slurm() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null 2>&1

cmd_install() {
    if have_slurm; then
        log "slurm and munge are installed ($(slurmctld -V))"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "installing slurm-wlm and munge needs root (apt-get); install them, or run as root"
    command -v apt-get >/dev/null || die "no apt-get: install slurm (slurmctld, slurmd, client commands) and munge yourself"
    local apt=(apt-get install -y -q --no-install-recommends slurm-wlm munge) apt_log=$DIR/log/apt.log
    mkdir -p "$DIR/log"
    log "installing slurm-wlm and munge from the Debian packages (log: $apt_log)"
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$apt_log" 2>&1; then
        log "apt-get install failed; running apt-get update and trying again"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$apt_log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$apt_log" 2>&1 ||
            { tail -20 "$apt_log" >&2; die "apt-get install slurm-wlm munge failed"; }
    fi
    have_slurm || die "slurm-wlm and munge installed, but slurmctld/slurmd/sbatch/munged are not on PATH"
    log "installed $(slurmctld -V)"
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$DIR"/{munge,state,spool,log,run}
    chmod 700 "$DIR/munge"
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node test cluster on localhost.
ClusterName=slmlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (default 120 s) before it can start again
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
LaunchType=launch/slurm
SchedulerType=sched/builtin
# a requeued job becomes eligible by time, not by an event: schedule every 2 s
SchedulerParameters=sched_interval=2
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# requeue within seconds: signals, then SIGKILL after KillWait
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }

cmd_start() {
    have_slurm || die "slurm/munge are not installed: run '$0 install' first"
    [[ $(id -u) -eq 0 ]] || die "starting slurmd needs root"
    if [[ -n $(pid_of munged) && -n $(pid_of slurmctld) && -n $(pid_of slurmd) ]] && [[ $(node_state) == idle* || $(node_state) == mix* || $(node_state) == alloc* ]]; then
        log "already running ($CONF, node $NODE: $(node_state))"
        return 0
    fi
    # a half-started cluster (one daemon died): start again from nothing
    cmd_stop quiet
    write_config
    local key=$DIR/munge/munge.key
    if [[ ! -s $key ]]; then
        (umask 077; head -c 1024 /dev/urandom >"$key")
    fi
    rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
    log "starting munged"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" ||
        die "munged did not start: see $DIR/log/munged.log"
    munge -S "$DIR/munge/munge.socket" -n </dev/null | unmunge -S "$DIR/munge/munge.socket" >/dev/null ||
        die "munge does not work (munge -n | unmunge): see $DIR/log/munged.log"
    log "starting slurmctld"
    slurmctld -c -f "$CONF" >>"$DIR/log/slurmctld.stdout" 2>&1 ||
        die "slurmctld did not start: see $DIR/log/slurmctld.log: $(tail -3 "$DIR/log/slurmctld.log" 2>/dev/null)"
    log "starting slurmd"
    slurmd -c -f "$CONF" -N "$NODE" >>"$DIR/log/slurmd.stdout" 2>&1 ||
        die "slurmd did not start: see $DIR/log/slurmd.log: $(tail -3 "$DIR/log/slurmd.log" 2>/dev/null)"
    local waited=0 state=""
    while :; do
        state=$(node_state || true)
        [[ $state == idle* ]] && break
        if [[ $state == drain* || $state == down* ]] && ((waited >= 5)); then
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        fi
        if ((waited >= START_TIMEOUT)); then
            log "node $NODE is '${state:-not reported}' after ${START_TIMEOUT}s; last lines of the logs:"
            tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
            cmd_stop quiet
            die "the local cluster did not come up"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "up: node $NODE idle, partition debug; use it with: export SLURM_CONF=$CONF"
}

wait_gone() {  # wait_gone SECONDS PID...: true once every pid has exited
    local deadline=$((SECONDS + $1)) pid alive
    shift
    while :; do
        alive=0
        for pid in "$@"; do is_alive "$pid" && alive=1; done
        ((alive == 0)) && return 0
        ((SECONDS >= deadline)) && return 1
        sleep 0.5
    done
}

cmd_stop() {
    local quiet=${1:-} ctld d munge jobs
    ctld=$(pid_of slurmctld)
    d=$(pid_of slurmd)
    munge=$(pid_of munged)
    if [[ -z $ctld && -z $d && -z $munge ]]; then
        [[ -n $quiet ]] || log "not running"
        return 0
    fi
    if [[ -n $ctld ]]; then
        # jobs first: their slurmstepd processes outlive slurmd
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 30))
            while [[ -n $(squeue -h -o %i 2>/dev/null || true) ]] && ((SECONDS < deadline)); do sleep 1; done
        fi
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    local pids=() pid
    for pid in $ctld $d; do pids+=("$pid"); done
    if ((${#pids[@]})) && ! wait_gone 20 "${pids[@]}"; then
        log "slurm daemons still running after 20s: sending SIGKILL to ${pids[*]}"
        kill -9 "${pids[@]}" 2>/dev/null || true
        wait_gone 5 "${pids[@]}" || true
    fi
    # job steps of a slurmd that was killed: slurmstepd processes whose config is ours
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    if [[ -n $munge ]]; then
        kill "$munge" 2>/dev/null || true
        wait_gone 10 "$munge" || { kill -9 "$munge" 2>/dev/null || true; }
    fi
    rm -f "$DIR"/run/*.pid
    [[ -n $quiet ]] || log "stopped"
}

cmd_status() {
    if [[ -z $(pid_of slurmctld) || -z $(pid_of slurmd) || -z $(pid_of munged) ]]; then
        log "not running (munged: $(pid_of munged || true), slurmctld: $(pid_of slurmctld || true), slurmd: $(pid_of slurmd || true))"
        return 1
    fi
    sinfo
    squeue
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    clean) cmd_stop quiet; rm -rf "$DIR"; log "removed $DIR" ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 {install|start|stop|status|clean|env}" >&2; exit 2 ;;
esac
