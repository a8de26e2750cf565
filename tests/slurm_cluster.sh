#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py and for trying the
# `slurm/` profile without a real cluster. Debian 12 (SLURM 22.05), root, no systemd needed.
#
#   tests/slurm_cluster.sh start    install what is missing (apt-get), configure, start, wait until idle
#   tests/slurm_cluster.sh stop     cancel jobs, stop every daemon, clear the spool, accounting data and config
#   tests/slurm_cluster.sh status   which daemons run, and sinfo (exit 1 when slurmctld is down)
#
# The node is this machine at 127.0.0.1 but advertises the size of an A100 node (32 CPUs, 256000 MB,
# 4 GPUs of type a100; SlurmdParameters=config_overrides), so the real profile's requests schedule
# unchanged. The GPUs are fake: character devices that clone /dev/null (/dev/fakegpuN), so jobs get
# CUDA_VISIBLE_DEVICES while torch (CPU build) still finds no GPU. Nothing enforces CPUs or memory.
# Accounting runs through slurmdbd and a local MariaDB, so sacct works as on a real cluster (it is
# the plugin's default status command) and records what each job asked for.
# `start` exits with 3 when the packages can be neither found nor installed (no root, no registry).
# Daemons are started directly and checked by pid file and /proc state: PID 1 here may not reap
# children, so a dead daemon can linger as a zombie that pgrep would still find.
set -euo pipefail

CLUSTER=diffattr            # ClusterName
PARTITION=gpu               # the one partition, the default
ACCOUNT=diffattr            # the account root submits under
NODE=$(hostname -s)
CPUS=32 MEMORY_MB=256000 GPUS=4 GPU_TYPE=a100
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server mariadb-client)

ETC=/etc/slurm
LOGS=/var/log/slurm
SPOOL_CTLD=/var/lib/slurm/slurmctld
SPOOL_D=/var/lib/slurm/slurmd
PID_CTLD=/run/slurmctld.pid
PID_D=/run/slurmd.pid
PID_DBD=/run/slurmdbd.pid
PID_MUNGE=/run/munge/munged.pid
PID_DB=/run/mysqld/mysqld.pid
DB_NAME=slurm_acct_db
APT_LOG=/tmp/slurm_cluster_apt.log

log() { echo "slurm_cluster: $*" >&2; }

# alive PIDFILE: the process named in PIDFILE exists and is not a zombie.
alive() {
    local pid state
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# wait_for SECONDS WHAT COMMAND...: retry COMMAND every 0.5 s until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

dead() { ! alive "$1"; }

# stop_pid PIDFILE: TERM, then KILL after 15 s.
stop_pid() {
    if alive "$1"; then
        local pid
        pid=$(cat "$1")
        kill -TERM "$pid" 2>/dev/null || true
        wait_for 15 "pid $pid to exit" dead "$1" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if ((EUID != 0)); then
        log "not root: cannot install ${missing[*]}"
        exit 3
    fi
    log "installing ${missing[*]}"
    # The packages' postinst scripts would start the daemons through init scripts, with a config
    # that does not exist yet: forbid that for the duration of the install.
    local guard=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$guard"
        chmod +x "$guard"
    fi
    local ok=0
    export DEBIAN_FRONTEND=noninteractive
    # Without package lists (a fresh container) the first try fails at once: update, then retry.
    if apt-get install -y -q --no-install-recommends "${missing[@]}" >"$APT_LOG" 2>&1 ||
        { apt-get update -q >>"$APT_LOG" 2>&1 &&
          apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1; }; then
        ok=1
    fi
    [[ -z $guard ]] || rm -f "$guard"
    if ((!ok)); then
        tail -n 20 "$APT_LOG" >&2
        log "apt-get could not install ${missing[*]} (log: $APT_LOG)"
        exit 3
    fi
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    alive "$PID_MUNGE" || runuser -u munge -- /usr/sbin/munged --force
    wait_for 20 "munged" bash -c 'munge -n | unmunge'
}

start_database() {
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if ! alive "$PID_DB"; then
        setsid /usr/sbin/mariadbd --user=mysql --pid-file="$PID_DB" --skip-networking \
            </dev/null >>/var/log/mysql-slurm.log 2>&1 &
    fi
    wait_for 60 "MariaDB" mariadb-admin ping
}

write_config() {
    install -d -m 0755 "$ETC" "$LOGS" "$SPOOL_CTLD" "$SPOOL_D"
    local i
    for ((i = 0; i < GPUS; i++)); do
        [[ -c /dev/fakegpu$i ]] || mknod "/dev/fakegpu$i" c 1 3
    done
    cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh: one node, this machine, sized like an A100 node.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
EnforcePartLimits=ALL
# Finished jobs stay known to slurmctld (squeue, scontrol show job) for 10 minutes.
MinJobAge=600
GresTypes=gpu
SlurmdParameters=config_overrides
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=$PID_CTLD
SlurmdPidFile=$PID_D
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# GPUs in sacct's TRES columns, and the plugin's --comment (rule and wildcards) in sacct's Comment.
AccountingStorageTRES=gres/gpu,gres/gpu:$GPU_TYPE
AccountingStoreFlags=job_comment
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB Gres=gpu:$GPU_TYPE:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$ETC/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu Type=$GPU_TYPE File=/dev/fakegpu[0-$((GPUS - 1))]
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$PID_DBD
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=$DB_NAME
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

start_slurmdbd() {
    alive "$PID_DBD" || slurmdbd
    wait_for 60 "slurmdbd" sacctmgr -n list cluster
    # The cluster, an account and root's association: each add is a no-op when already there.
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=tests Organization=diffattr \
        >/dev/null 2>&1 || true
    sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" DefaultAccount="$ACCOUNT" \
        >/dev/null 2>&1 || true
    sacctmgr -n -P list association user=root account="$ACCOUNT" format=account | grep -qx "$ACCOUNT"
}

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null; }

start_slurm() {
    alive "$PID_CTLD" || slurmctld
    wait_for 30 "slurmctld" scontrol ping
    alive "$PID_D" || slurmd
    local deadline=$((SECONDS + 60)) state
    while true; do
        state=$(node_state || true)
        case $state in
            idle|mix|alloc) return 0 ;;
            down*|drain*|drng*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        if ((SECONDS >= deadline)); then
            log "node $NODE is '$state', not idle, after 60 s (see $LOGS/slurmd.log, $LOGS/slurmctld.log)"
            return 1
        fi
        sleep 0.5
    done
}

start() {
    install_packages
    if ((EUID != 0)); then
        log "not root: cannot start the daemons"
        exit 3
    fi
    start_munge
    write_config
    start_database
    start_slurmdbd
    start_slurm
    log "up: node $NODE $(node_state), partition $PARTITION, account $ACCOUNT," \
        "$CPUS CPUs, $MEMORY_MB MB, gres gpu:$GPU_TYPE:$GPUS"
}

stop() {
    if alive "$PID_CTLD"; then
        scancel --quiet --user=root 2>/dev/null || true
        scontrol shutdown >/dev/null 2>&1 || true  # slurmctld and slurmd
    fi
    stop_pid "$PID_D"
    stop_pid "$PID_CTLD"
    stop_pid "$PID_DBD"
    if alive "$PID_DB"; then
        mariadb -e "DROP DATABASE IF EXISTS $DB_NAME" >/dev/null 2>&1 || true
        mariadb-admin shutdown >/dev/null 2>&1 || true
        stop_pid "$PID_DB"
    fi
    stop_pid "$PID_MUNGE"
    rm -rf "${SPOOL_CTLD:?}"/* "${SPOOL_D:?}"/*
    # the configuration `start` wrote: left behind, it points SLURM's tools at a controller that is
    # gone, and each `scontrol` (the SLURM executor plugin calls it when Snakemake loads it) then
    # waits about 9 s for it
    rm -f "$ETC/slurm.conf" "$ETC/gres.conf" "$ETC/slurmdbd.conf"
    log "stopped"
}

status() {
    local entry
    for entry in munged:$PID_MUNGE mariadbd:$PID_DB slurmdbd:$PID_DBD slurmctld:$PID_CTLD slurmd:$PID_D; do
        if alive "${entry#*:}"; then
            echo "${entry%%:*} running (pid $(cat "${entry#*:}"))"
        else
            echo "${entry%%:*} stopped"
        fi
    done
    alive "$PID_CTLD" && sinfo -N -o "%N %P %t %c %m %G"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
