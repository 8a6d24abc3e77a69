#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost, for testing the SLURM profile (workflow/profiles/slurm).
#
# Usage:   sudo tests/slurm/start-local-slurm.sh STATE_DIR
# Stop:    sudo tests/slurm/stop-local-slurm.sh STATE_DIR
#
# What it starts (each in the background, its PID written to STATE_DIR/pids/<name>.pid):
#   munged     only if no munged answers on /run/munge/munge.socket.2 yet (one that was running is reused, never stopped)
#   slurmctld  controller, no accounting database (AccountingStorageType=accounting_storage/none)
#   slurmd     node "localhost" with a fake GPU (gres gpu:1 backed by a char device made with mknod)
# Partitions: "cpu" (default) and "gpu", both on the same node; the names match workflow/profiles/slurm/partitions.yaml.
# Without an accounting database Snakemake must follow jobs with squeue (the profile sets
# `slurm-status-command: squeue`); MinJobAge keeps finished jobs visible to squeue/scontrol.
#
# Files: STATE_DIR/{slurm.conf,gres.conf,log/,state/,spool/,fakedev/,pids/}.
# /etc/slurm/slurm.conf and /etc/slurm/gres.conf become symlinks to STATE_DIR: the `srun` that
# snakemake-executor-plugin-slurm-jobstep runs inside each job drops SLURM_CONF and reads /etc/slurm.
# A real /etc/slurm/slurm.conf (not a symlink of ours) is never touched: the script refuses to start.
#
# Needs: root, Debian/Ubuntu packages slurmctld slurmd slurm-client munge
#   (apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge), and mknod.
# Tunables (environment): SLURM_LOCAL_CPUS (default: nproc), SLURM_LOCAL_MEM_MB (default: 90 % of MemTotal),
#   SLURM_LOCAL_MIN_JOB_AGE (seconds, default 1800; must stay >= 120 for squeue status checks).
# Exit status: 0 started; 2 usage; 3 cannot run here (not root, missing program); 4 another SLURM owns
#   /etc/slurm or the ports; 1 a daemon did not come up (see STATE_DIR/log/*.log).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then
    usage >&2
    exit 2
fi

die() { local code=$1; shift; echo "start-local-slurm: $*" >&2; exit "$code"; }

[[ $(id -u) -eq 0 ]] || die 3 "needs root (slurmd and munged run as root/munge)"
for prog in slurmctld slurmd munged munge unmunge sbatch squeue sinfo scontrol setpriv mknod; do
    command -v "$prog" >/dev/null 2>&1 || die 3 "'$prog' not found (apt-get install slurmctld slurmd slurm-client munge)"
done
[[ -r /etc/munge/munge.key ]] || die 3 "/etc/munge/munge.key missing (the munge package creates it)"

mkdir -p "$1"
D=$(cd "$1" && pwd -P)
mkdir -p "$D"/{log,state,spool,fakedev,pids}

# Another cluster (or a previous run that was not stopped) must not be clobbered.
for f in slurm.conf gres.conf; do
    target=/etc/slurm/$f
    if [[ -L $target ]]; then
        other=$(dirname "$(readlink "$target")")
        if [[ $other != "$D" ]] && [[ -s $other/pids/slurmctld.pid ]] &&
            kill -0 "$(cut -d' ' -f1 "$other/pids/slurmctld.pid")" 2>/dev/null; then
            die 4 "$target points to a running local cluster in $other; stop it first: $(dirname "$0")/stop-local-slurm.sh $other"
        fi
    elif [[ -e $target ]]; then
        die 4 "$target exists and is not ours; this script does not touch a real SLURM installation"
    fi
done
if scontrol ping >/dev/null 2>&1; then
    die 4 "a slurmctld already answers (scontrol ping); stop it first"
fi

cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
mem_total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
mem_mb=${SLURM_LOCAL_MEM_MB:-$((mem_total_mb * 9 / 10))}
min_job_age=${SLURM_LOCAL_MIN_JOB_AGE:-1800}

# Fake GPU: the gpu GRES needs a device file (a file-less `Name=gpu Count=1` is dropped by slurmd and
# the node becomes INVAL). Major 195 is the NVIDIA major; nothing opens it, the jobs run on the CPU.
[[ -e $D/fakedev/nvidia0 ]] || mknod "$D/fakedev/nvidia0" c 195 0 ||
    die 3 "mknod failed (no CAP_MKNOD?); the fake GPU needs a character device"

cat >"$D/slurm.conf" <<EOF
# written by tests/slurm/start-local-slurm.sh
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=$min_job_age
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
cat >"$D/gres.conf" <<EOF
NodeName=localhost Name=gpu File=$D/fakedev/nvidia0
EOF

mkdir -p /etc/slurm
ln -sfn "$D/slurm.conf" /etc/slurm/slurm.conf
ln -sfn "$D/gres.conf" /etc/slurm/gres.conf
export SLURM_CONF=$D/slurm.conf

record() { echo "$2 $1" >"$D/pids/$1.pid"; }  # "<pid> <name>": stop checks the name before it kills
# From here on, a failure stops whatever this script started (logs stay in STATE_DIR/log).
trap 'rc=$?; if [[ $rc -ne 0 ]]; then "$(dirname "$0")/stop-local-slurm.sh" "$D" >&2 || true; fi' EXIT

# munge: reuse a running munged, else start one in the foreground (setpriv execs, so $! is munged).
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "start-local-slurm: reusing the munged that is already running (it will not be stopped)"
else
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    setsid setpriv --reuid=munge --regid=munge --init-groups -- \
        munged -F --log-file="$D/log/munged.log" </dev/null >>"$D/log/munged.out" 2>&1 &
    record munged $!
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die 1 "munged did not come up (see $D/log/munged.log)"
fi

setsid slurmctld -D -c -f "$D/slurm.conf" </dev/null >>"$D/log/slurmctld.out" 2>&1 &
record slurmctld $!
for _ in $(seq 100); do
    scontrol ping >/dev/null 2>&1 && break
    sleep 0.2
done
scontrol ping >/dev/null 2>&1 || die 1 "slurmctld did not answer (see $D/log/slurmctld.log)"

setsid slurmd -D -N localhost -f "$D/slurm.conf" </dev/null >>"$D/log/slurmd.out" 2>&1 &
record slurmd $!

# Wait until both partitions show the node idle.
state=""
for _ in $(seq 150); do
    state=$(sinfo -h -N -o '%P %t' 2>/dev/null | sort | tr '\n' ' ')
    [[ $state == "cpu* idle gpu idle " ]] && break
    if [[ $state == *drain* || $state == *down* || $state == *inval* ]]; then
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.2
done
if [[ $state != "cpu* idle gpu idle " ]]; then
    scontrol show node localhost >&2 || true
    die 1 "node not idle on both partitions (sinfo: '$state'; see $D/log/slurmd.log)"
fi

scontrol show node localhost | grep -E 'Gres=gpu:1' >/dev/null || die 1 "node has no gres gpu:1"
echo "start-local-slurm: up in $D (CPUs=$cpus RealMemory=${mem_mb}MB MinJobAge=${min_job_age}s)"
sinfo
