#!/usr/bin/env bash
# Stop the local Slurm cluster started by start.sh: slurmd's, slurmctld,
# slurmdbd, MariaDB, munged. Idempotent (does nothing for what is not running).
#
#   slurm/local/stop.sh [--purge]
#
# Jobs still queued or running are cancelled first (so no job processes are
# left behind). --purge also deletes ${TULU_SLURM_HOME:-/tmp/tulu-slurm}
# (conf, spool, logs, controller state and the accounting DB). NOTE: after a
# purge job ids restart at 1, so ids from before and after a wipe collide;
# tests must key their output on a fresh folder, not on the job id.
set -euo pipefail
PURGE=0
for a in "$@"; do
  case $a in
    --purge) PURGE=1 ;;
    -h|--help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
take_lock

if alive "$CTLD_PID" slurmctld && [[ -f $SLURM_CONF ]]; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
  if [[ -n ${jobs// /} ]]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
      [[ -z $(squeue -h -t R,CG,S -o %A 2>/dev/null) ]] && break
      sleep 0.1
    done
  fi
fi

n=0
for f in $(slurmd_pidfiles); do alive "$f" slurmd && n=$((n + 1)); done
# shellcheck disable=SC2046
stop_pidfiles 20 slurmd $(slurmd_pidfiles)
((n)) && log "stopped $n slurmd"
daemons=("$CTLD_PID:slurmctld" "$DBD_PID:slurmdbd" "$DB_PID:mariadbd")
# munged (/run/munge) is shared by the whole host: stop it only if this
# cluster's start.sh started it.
[[ -f $MUNGE_OWNED ]] && daemons+=("$MUNGE_PID:munged")
for d in "${daemons[@]}"; do
  f=${d%:*} c=${d#*:}
  if alive "$f" "$c"; then
    stop_pidfile "$f" "$c" 30
    log "stopped $c"
  fi
done
rm -f "$MUNGE_OWNED"

if ((PURGE)); then
  if [[ -d $H ]]; then
    [[ -f $MARKER && $H != / ]] || { log "refusing to purge $H: no $MARKER in it"; exit 1; }
    rm -rf "$H"
    log "purged $H (job ids restart at 1)"
  fi
fi
