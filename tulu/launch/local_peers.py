"""The local executor's stand-in for ``srun --kill-on-bad-exit``: a rank whose peer failed stops.

Under Slurm a task that exits non-zero takes the whole step down. submitit's local controller
waits for every task instead, so a rank that crashed before the rendezvous (or while its peers
wait on the store) left them waiting out the process group's time-out (30 min), and the job
with them. Each local task therefore runs `watch` in a daemon thread:

- it writes its pid to ``<job folder>/.tasks/<rank>.pid``;
- every ``poll_s`` it looks at its peers: a peer whose result pickle says "error" failed; a peer
  whose process is gone without a result pickle (``grace_s`` later) was killed (SIGKILL, the
  OOM killer) or exited without submitit's epilogue;
- then it names the peer and why, prints where this rank was (all threads' stacks), and exits
  with status 1: the job ends FAILED within seconds, its logs say which rank failed first.

A peer that finished (result "success") is left alone; so is one that has not started yet.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from monitoring.agent import pid_running

__all__ = ["failed_peer", "watch", "start"]

EXIT_PEER_FAILED = 1


def _pid_file(folder: Path, rank: int) -> Path:
    return folder / ".tasks" / f"{rank}.pid"


def _result(folder: Path, job_id: str, rank: int) -> str | None:
    """The tag of rank ``rank``'s result pickle ("success", "error"), or None if there is none."""
    from submitit.core.utils import JobPaths, pickle_load

    path = JobPaths(folder, job_id, rank).result_pickle
    if not path.exists():
        return None
    try:
        return str(pickle_load(path)[0])
    except Exception:  # noqa: BLE001 - being written: look again next round
        return None


def failed_peer(folder: Path, job_id: str, rank: int, ntasks: int, gone_since: dict[int, float],
                grace_s: float = 3.0, now: float | None = None) -> tuple[int, str] | None:
    """(peer, why) for the first peer of ``rank`` that failed, or None. ``gone_since`` carries, from
    one call to the next, when a peer's process was first seen gone without a result."""
    now = time.monotonic() if now is None else now
    for peer in range(ntasks):
        if peer == rank:
            continue
        tag = _result(folder, job_id, peer)
        if tag == "error":
            return peer, "raised an exception (its traceback is in its log)"
        if tag is not None:
            continue
        try:
            pid = int(_pid_file(folder, peer).read_text())
        except (OSError, ValueError):
            continue                      # not started yet
        if pid_running(pid):           # a zombie is gone: the controller reaps its tasks, not at once
            gone_since.pop(peer, None)
            continue
        first = gone_since.setdefault(peer, now)
        if now - first >= grace_s and _result(folder, job_id, peer) is None:
            return peer, f"process {pid} is gone without a result (killed by a signal, or the OOM killer)"
    return None


def watch(folder: Path, job_id: str, rank: int, ntasks: int, *, poll_s: float = 0.5,
          grace_s: float = 3.0, exit=os._exit) -> None:
    gone: dict[int, float] = {}
    while True:
        found = failed_peer(folder, job_id, rank, ntasks, gone, grace_s)
        if found is not None:
            peer, why = found
            print(f"[tulu rank {rank}] local rank {peer} {why}; rank {rank} stops too (the local "
                  "executor's stand-in for srun --kill-on-bad-exit). Where this rank was:",
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stdout.flush()
            sys.stderr.flush()
            exit(EXIT_PEER_FAILED)
            return
        time.sleep(poll_s)


def start() -> threading.Thread | None:
    """In a submitit local task with peers: record this task's pid and start `watch` in a daemon
    thread; None elsewhere (a Slurm task, a one-task job, no submitit environment)."""
    try:
        import submitit

        job = submitit.JobEnvironment()
    except Exception:  # noqa: BLE001 - not in a submitit task
        return None
    if job.num_tasks < 2 or os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    folder = Path(job.paths.folder)
    pid_file = _pid_file(folder, job.global_rank)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    t = threading.Thread(target=watch, args=(folder, str(job.job_id), job.global_rank, job.num_tasks),
                         name="local-peers", daemon=True)
    t.start()
    return t
