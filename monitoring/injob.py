"""In-job restart with spare nodes (issue 16): the state the batch script's step loop and the
monitor share.

A job with ``cluster.spare_nodes: S`` allocates ``nodes + S`` nodes; its training step runs on
``nodes`` of them, the *active* list. On a hang or crash the monitor (`recovery.handle_fault`,
action "restart") kills the step, swaps the culprit's node(s) in the active list for spares
and bumps the attempt; the batch script's step loop (`recovery.step_loop_lines`) then starts a
new step on the new list, which resumes from the last committed checkpoint as a requeued job
would, without leaving the allocation. Files in ``<monitor_dir>/injob/`` (each written whole):

- ``<job>.json``: ``{"attempt", "active", "spares", "replaced", "slurm_restarts"}``, the state;
- ``<job>.nodes``: the active nodes, comma-separated (the step's ``srun --nodelist``);
- ``<job>.attempt``: the current attempt (the step's ``TULU_ATTEMPT``);
- ``restarted/<job>_<attempt>.json``: a restart was decided for that attempt (the loop's cue).

Attempts count every step the job started, in-job restarts and requeues alike, so each has its
own number (progress records, reports, fault injection and rendezvous ports key on it): the
first batch script of a job starts at ``SLURM_RESTART_COUNT``, a requeued one one above the last
attempt the previous allocation used. Without spares none of this exists and the attempt is
Slurm's restart count, as before.

    python -m monitoring.injob start --monitor-dir D --job-id J --nodes N
        (the batch script, once per allocation: reads $SLURM_JOB_NODELIST and
         $SLURM_RESTART_COUNT, writes the state, prints the attempt)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from monitoring import slurm
from monitoring.storage import _atomic_write

__all__ = ["EXIT_RESTART", "RESTARTABLE", "read_state", "start", "current_attempt",
           "spares_left", "restart", "restarted", "slurm_restarts_at_start", "main"]

EXIT_RESTART = 80          # on_exit --may-restart: "start the next step" (the loop's cue)
RESTARTABLE = ("hang", "crash", "stall", "startup")   # a timeout or preemption is Slurm's
INJOB = "injob"


def _dir(monitor_dir) -> Path:
    return Path(monitor_dir) / INJOB


def _job(job_id) -> str:
    return str(job_id or "local")


def _write(path: Path, text: str) -> None:
    _atomic_write(path, text.encode())


def read_state(monitor_dir, job_id) -> dict | None:
    try:
        return json.loads((_dir(monitor_dir) / f"{_job(job_id)}.json").read_text())
    except (OSError, ValueError):
        return None


def _save(monitor_dir, job_id, state: dict) -> None:
    d = _dir(monitor_dir)
    # The plain files first, the JSON last: whoever reads the JSON finds the loop's files ready.
    _write(d / f"{_job(job_id)}.nodes", ",".join(state["active"]) + "\n")
    _write(d / f"{_job(job_id)}.attempt", f"{state['attempt']}\n")
    _write(d / f"{_job(job_id)}.json", json.dumps(state, sort_keys=True))


def start(monitor_dir, job_id, nodelist: list[str], nodes: int, slurm_restarts: int) -> dict:
    """The state of a new allocation: the first ``nodes`` of ``nodelist`` active, the rest
    spares; the attempt one above the last one this job used (never below Slurm's count)."""
    if len(nodelist) < nodes:
        raise ValueError(f"the allocation has {len(nodelist)} node(s) ({','.join(nodelist)}), "
                         f"the training step needs {nodes}")
    prev = read_state(monitor_dir, job_id)
    attempt = slurm_restarts if prev is None else max(int(prev["attempt"]) + 1, slurm_restarts)
    state = {"attempt": attempt, "active": list(nodelist[:nodes]), "spares": list(nodelist[nodes:]),
             "replaced": [], "slurm_restarts": slurm_restarts, "time": time.time()}
    _save(monitor_dir, job_id, state)
    return state


def current_attempt(monitor_dir, job_id, default: int) -> int:
    """The running step's attempt (``default`` for a job without spares)."""
    try:
        return int((_dir(monitor_dir) / f"{_job(job_id)}.attempt").read_text().strip())
    except (OSError, ValueError):
        return default


def spares_left(monitor_dir, job_id, attempt: int | None = None) -> int:
    """Spare nodes this allocation still holds (0 without spares, or when ``attempt`` is not
    the current one: a stale process does not restart anything)."""
    state = read_state(monitor_dir, job_id)
    if state is None or (attempt is not None and int(state["attempt"]) != attempt):
        return 0
    return len(state["spares"])


def needed_spares(monitor_dir, job_id, culprit_nodes) -> int:
    """How many spares replacing ``culprit_nodes`` takes (the culprits in the active list)."""
    state = read_state(monitor_dir, job_id) or {"active": []}
    return len(set(culprit_nodes) & set(state["active"]))


def _marker(monitor_dir, job_id, attempt: int) -> Path:
    return _dir(monitor_dir) / "restarted" / f"{_job(job_id)}_{attempt}.json"


def restart(monitor_dir, job_id, attempt: int, culprit_nodes, reason: str) -> dict:
    """Swap the culprit nodes of the active list for spares, bump the attempt, mark the
    restart of ``attempt``. Returns the new state (``replaced`` lists what went where)."""
    state = read_state(monitor_dir, job_id)
    if state is None or int(state["attempt"]) != attempt:
        raise ValueError(f"no in-job restart state for job {job_id} attempt {attempt} "
                         f"(found {state and state.get('attempt')})")
    active, spares = list(state["active"]), list(state["spares"])
    swaps = []
    for node in dict.fromkeys(culprit_nodes):
        if node in active:
            if not spares:
                raise ValueError(f"no spare node left to replace {node}")
            new = spares.pop(0)
            active[active.index(node)] = new
            swaps.append({"node": node, "by": new, "attempt": attempt})
    state.update(attempt=attempt + 1, active=active, spares=spares,
                 replaced=list(state["replaced"]) + swaps, time=time.time())
    _save(monitor_dir, job_id, state)
    _write(_marker(monitor_dir, job_id, attempt),
           json.dumps({"reason": reason, "swaps": swaps, "next_attempt": attempt + 1,
                       "active": active, "time": time.time()}, sort_keys=True))
    return {**state, "swaps": swaps}


def restarted(monitor_dir, job_id, attempt: int) -> dict | None:
    """The restart decided for ``attempt``, or None."""
    try:
        return json.loads(_marker(monitor_dir, job_id, attempt).read_text())
    except (OSError, ValueError):
        return None


def slurm_restarts_at_start(attempt: int) -> int:
    """Slurm's restart count when this allocation's batch script started: what "was this
    attempt requeued already" (``Restarts`` above it) compares with. The attempt itself for a
    job without spares (they are equal there)."""
    try:
        return int(os.environ["TULU_SLURM_RESTARTS"])
    except (KeyError, ValueError):
        return attempt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.injob", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start"])
    ap.add_argument("--monitor-dir", required=True)
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--nodes", type=int, required=True, help="nodes of the training step")
    args = ap.parse_args(argv)
    nodelist = slurm.expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", ""))
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    try:
        state = start(args.monitor_dir, args.job_id, nodelist, args.nodes, restarts)
    except (OSError, ValueError) as e:
        print(f"tulu-hpc in-job restart: cannot set up the step's nodes: {e}", file=sys.stderr)
        return 1
    print(state["attempt"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
