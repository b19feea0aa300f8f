# Shared by start.sh, stop.sh and status.sh (sourced, not run).
# A real Slurm cluster on one host, no systemd: see docs/design.md section 7.

export PATH="$PATH:/usr/sbin:/sbin" # daemons live in sbin
H="${TULU_SLURM_HOME:-/tmp/tulu-slurm}"
CLUSTER_NAME="${TULU_SLURM_CLUSTER:-tulu}"
HOST_SHORT="$(hostname -s)"

# Fixed ports, away from Slurm's defaults (6817-6819) and MariaDB's 3306 so a
# system-wide install on the same host cannot collide with this one.
CTLD_PORT=16817
DBD_PORT=16819
DB_PORT=16306
SLURMD_PORT_BASE=17000 # node nX listens on 17000+X

ETC="$H/etc"
RUN="$H/run"
LOG="$H/log"
DEV="$H/dev"
SPOOL="$H/spool"
STATE="$H/state"
DBDATA="$H/db"      # MariaDB data dir (owned by mysql)
DBRUN="$H/mysql"    # MariaDB pid, socket, error log (owned by mysql)
DB_SOCK="$DBRUN/mariadb.sock"
DB_PID="$DBRUN/mariadb.pid"
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
CTLD_PID="$RUN/slurmctld.pid"
DBD_PID="$RUN/slurmdbd.pid"
MARKER="$H/.tulu-slurm-home"
MUNGE_OWNED="$RUN/munged.started-here" # munged is host-wide: stop it only if we started it

export SLURM_CONF="$ETC/slurm.conf"

# take_lock: serialise start.sh/stop.sh runs (several test sessions may call
# start.sh at once). The lock file sits beside the home, so --purge can remove it.
take_lock() {
  mkdir -p "$(dirname "$H")"
  exec 9>"${H%/}.lock"
  flock -w 300 9 || die "another start.sh/stop.sh holds ${H%/}.lock for 300 s"
}

log() { printf '[tulu-slurm] %s\n' "$*" >&2; }
die() { printf '[tulu-slurm] ERROR: %s\n' "$*" >&2; exit 1; }

# pid_of PIDFILE COMM: print the pid if the file names a live process whose
# /proc/PID/comm is COMM (guards against pid reuse); else print nothing.
pid_of() {
  local f=$1 comm=$2 pid
  [[ -r $f ]] || return 1
  pid=$(tr -dc '0-9' <"$f" 2>/dev/null) || return 1
  [[ -n $pid ]] || return 1
  [[ -r /proc/$pid/comm ]] || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
  running "$pid" || return 1
  echo "$pid"
}

# running PID: the process exists and is not a zombie (this host's init may
# reap daemons that exited late).
running() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [[ ${st:0:1} != Z ]]
}

alive() { pid_of "$1" "$2" >/dev/null; }

# stop_pidfiles SECONDS COMM PIDFILE...: SIGTERM every live one at once, wait
# up to SECONDS for all to exit, then SIGKILL what is left; removes the files.
stop_pidfiles() {
  local secs=$1 comm=$2 f pid i left
  shift 2
  local -a pids=()
  for f in "$@"; do
    if pid=$(pid_of "$f" "$comm"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for ((i = 0; i < secs * 20; i++)); do
    left=0
    for pid in "${pids[@]}"; do running "$pid" && left=1; done
    ((left)) || break
    sleep 0.05
  done
  for pid in "${pids[@]}"; do
    if running "$pid"; then
      log "$comm (pid $pid) ignored SIGTERM for ${secs}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$@"
}

# stop_pidfile PIDFILE COMM [SECONDS]
stop_pidfile() { stop_pidfiles "${3:-20}" "$2" "$1"; }

slurmd_pidfiles() { compgen -G "$RUN/slurmd-*.pid" || true; }

# port_busy PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# need_free_port PORT WHAT: fail clearly when a daemon we do not own (another
# TULU_SLURM_HOME, or a system-wide install) already holds our port.
need_free_port() {
  port_busy "$1" || return 0
  die "port $1 (for $2) is already in use by a process not started from $H.
Another local cluster (different TULU_SLURM_HOME?) may be running: stop it with
  TULU_SLURM_HOME=<its home> $(dirname "${BASH_SOURCE[0]}")/stop.sh"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping >/dev/null 2>&1; }
