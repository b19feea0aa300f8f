#!/usr/bin/env bash
# Print which daemons of the local Slurm cluster are alive, then sinfo.
# Exit status 0 when munged, MariaDB, slurmdbd, slurmctld and >= 1 slurmd are alive.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
rc=0
show() {
  local name=$1 f=$2 c=$3 pid
  if pid=$(pid_of "$f" "$c"); then printf '%-10s up   pid %s\n' "$name" "$pid"
  else printf '%-10s DOWN\n' "$name"; rc=1; fi
}
echo "TULU_SLURM_HOME=$H"
show munged "$MUNGE_PID" munged
show mariadb "$DB_PID" mariadbd
show slurmdbd "$DBD_PID" slurmdbd
show slurmctld "$CTLD_PID" slurmctld
nd=0
for f in $(slurmd_pidfiles); do
  n=${f##*/slurmd-}; n=${n%.pid}
  show "slurmd $n" "$f" slurmd
  alive "$f" slurmd && nd=$((nd + 1))
done
((nd)) || { echo "slurmd     none"; rc=1; }
if [[ -f $SLURM_CONF ]] && alive "$CTLD_PID" slurmctld; then
  echo; sinfo; echo; squeue
fi
exit $rc
