#!/usr/bin/env bash
# Stop the local SLURM cluster that tests/slurm/start-local-slurm.sh started.
#
# Usage:   sudo tests/slurm/stop-local-slurm.sh STATE_DIR
#
# Cancels the jobs still known to that cluster, then sends TERM (KILL after 10 s) to exactly the
# processes whose PIDs the start script recorded in STATE_DIR/pids/ (slurmd, slurmctld, and munged
# only if the start script started it) - a PID is only signalled while it still runs the recorded
# program. Removes /etc/slurm/{slurm,gres}.conf only when they are symlinks into STATE_DIR.
# STATE_DIR itself (logs included) is left for inspection. Safe to run twice.
set -uo pipefail

if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi
[[ -d $1 ]] || { echo "stop-local-slurm: no such directory: $1" >&2; exit 2; }
D=$(cd "$1" && pwd -P)

# Jobs first, while slurmctld and slurmd can still end them (their steps outlive slurmd otherwise).
if [[ -s $D/pids/slurmctld.pid && -f $D/slurm.conf ]]; then
    export SLURM_CONF=$D/slurm.conf
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(timeout 5 squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

alive() {  # alive PID NAME: the process runs and is still the program we recorded
    local comm
    comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
    [[ $comm == "$2" ]]
}

for name in slurmd slurmctld munged; do
    file=$D/pids/$name.pid
    [[ -s $file ]] || continue
    read -r pid recorded <"$file"
    if alive "$pid" "$recorded"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do
            alive "$pid" "$recorded" || break
            sleep 0.2
        done
        if alive "$pid" "$recorded"; then
            kill -KILL "$pid" 2>/dev/null
            echo "stop-local-slurm: $name ($pid) needed SIGKILL" >&2
        fi
        echo "stop-local-slurm: stopped $name ($pid)"
    fi
    rm -f "$file"
done

for f in slurm.conf gres.conf; do
    target=/etc/slurm/$f
    if [[ -L $target && $(readlink "$target") == "$D/$f" ]]; then
        rm -f "$target"
    fi
done
exit 0
