"""The recovery policy: the ONE place that requeues, stops or cancels a job.

Callers: the sidecar (a hang or a crash it saw while the job runs), `monitoring.on_exit` (the
batch script's EXIT trap, after ``srun`` returned), and the graceful-stop path (through
`request_requeue`, honoured by on_exit). Every decision is appended, with its reason, to
``<monitor_dir>/decisions.jsonl``.

Policy (`decide`, a pure function of the decision history):
- each fault requeue spends one unit of ``restart_budget``; an exhausted budget stops;
- the same fault kind at the same step as the previous fault requeue means the restart made no
  progress: stop, rather than burn the cluster in a loop (NVRx's "do not restart" rule);
- a stop writes ``do_not_requeue.json`` and on_exit exits with `EXIT_DO_NOT_REQUEUE` (79), so
  ``sacct`` shows why the chain ended; a still-running (hung) job is cancelled with scancel.

Requeue with exclusion: Slurm changes ``ExcNodeList`` only while a job is pending, so the
sequence is ``scontrol requeuehold J`` -> ``scontrol update JobId=J ExcNodeList=...`` ->
``scontrol release J``, and only when `monitoring.slurm.spare_nodes` says the partition can
still place the job without the culprit's node(s); otherwise a plain ``scontrol requeue J``.

Double requeues are avoided under a file lock: a marker ``requeued/<job>_<attempt>.json`` is
written by every requeue made here, and ``scontrol show job`` tells whether someone else
(submitit's USR2 handler) already requeued this attempt (``Restarts`` > attempt).
"""

from __future__ import annotations

import fcntl
import json
import signal
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from monitoring import slurm
from monitoring.config import MonitorConfig

__all__ = ["EXIT_DO_NOT_REQUEUE", "Decision", "decide", "handle_fault", "requeue",
           "request_requeue", "requeue_requested", "already_requeued", "stop_reason",
           "read_decisions", "record_decision", "setup_lines"]

EXIT_DO_NOT_REQUEUE = 79
STOP_MARKER = "do_not_requeue.json"
NOT_COUNTED = ("requested",)   # requeues that do not spend the fault budget (preemption etc.)


@dataclass(frozen=True, slots=True)
class Decision:
    action: str                   # "requeue" | "stop" | "none"
    reason: str
    exclude_nodes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- the policy
def decide(history: list[dict], *, job_id: str | None, attempt: int, fault_kind: str,
           step: int, cfg: MonitorConfig) -> Decision:
    """Requeue or stop after ``fault_kind`` at ``step`` (the highest step any rank finished)."""
    mine = [d for d in history if d.get("job_id") == job_id and d.get("action") == "requeue"
            and d.get("fault_kind") not in NOT_COUNTED]
    if len(mine) >= cfg.restart_budget:
        return Decision("stop", f"restart budget exhausted: {len(mine)} fault requeue(s) of "
                                f"{cfg.restart_budget} already used (MonitorConfig."
                                f"restart_budget); last fault: {fault_kind} at step {step}")
    previous = [d for d in mine if d.get("attempt", -1) < attempt]
    if previous:
        last = previous[-1]
        if last.get("fault_kind") == fault_kind and last.get("step") == step:
            return Decision("stop", f"no progress since the previous restart: the same fault "
                                    f"({fault_kind}) at the same step ({step}) as attempt "
                                    f"{last.get('attempt')}; requeueing again would loop. "
                                    f"Read the reports, fix the cause, resubmit")
    return Decision("requeue", f"{fault_kind} at step {step}: requeue "
                               f"{len(mine) + 1}/{cfg.restart_budget}")


# ---------------------------------------------------------------------------- records
def _dir(monitor_dir) -> Path:
    d = Path(monitor_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _locked(monitor_dir) -> Iterator[None]:
    with open(_dir(monitor_dir) / ".recovery.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_decisions(monitor_dir) -> list[dict]:
    path = Path(monitor_dir) / "decisions.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write
    return out


def record_decision(monitor_dir, **entry) -> dict:
    entry = {"time": time.time(), **entry}
    line = json.dumps(entry, sort_keys=True) + "\n"
    fd = os.open(_dir(monitor_dir) / "decisions.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return entry


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _marker(monitor_dir, kind: str, job_id, attempt) -> Path:
    return Path(monitor_dir) / kind / f"{job_id or 'local'}_{attempt}.json"


def stop_reason(monitor_dir, job_id: str | None = None) -> str | None:
    """Why job ``job_id``'s restart chain was stopped (any job's if None), or None. A new
    submission (another job id) into the same folder is not blocked."""
    try:
        data = json.loads((Path(monitor_dir) / STOP_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if job_id is not None and data.get("job_id") not in (None, job_id):
        return None
    return data.get("reason", "stopped")


def already_requeued(monitor_dir, job_id: str | None, attempt: int) -> str | None:
    """Who already requeued this attempt ("monitor", "slurm: Restarts=N"), or None."""
    m = _marker(monitor_dir, "requeued", job_id, attempt)
    if m.exists():
        try:
            return f"monitor ({json.loads(m.read_text()).get('by', '?')})"
        except (OSError, ValueError):
            return "monitor"
    if job_id:
        try:
            info = slurm.show_job(job_id)
        except slurm.SlurmCommandError:
            return None
        if info.restarts > attempt:
            return f"slurm: Restarts={info.restarts} > attempt {attempt} (submitit or a user)"
    return None


def request_requeue(monitor_dir, job_id: str | None, attempt: int, reason: str) -> None:
    """Graceful-stop path (preemption, time limit): the ranks saved and will exit 0; ask the
    EXIT trap (on_exit) to requeue once srun has returned. Does not spend the fault budget."""
    _write_json(_marker(monitor_dir, "requeue_requested", job_id, attempt),
                {"reason": reason, "time": time.time(), "pid": os.getpid()})


def requeue_requested(monitor_dir, job_id: str | None, attempt: int) -> str | None:
    m = _marker(monitor_dir, "requeue_requested", job_id, attempt)
    try:
        return json.loads(m.read_text()).get("reason", "requested")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- actions
def requeue(job_id: str, reason: str, exclude_nodes: list[str] | tuple[str, ...] = (), *,
            monitor_dir=None, attempt: int | None = None, by: str = "") -> list[str]:
    """Requeue ``job_id``, excluding ``exclude_nodes`` when the partition has spare nodes.
    Returns the nodes actually excluded. With ``monitor_dir``, writes this attempt's requeued
    marker (written *before* scontrol runs: the requeue kills the caller's job soon after)."""
    excluded: list[str] = []
    note = ""
    if exclude_nodes:
        try:
            job = slurm.show_job(job_id)
            sinfo = slurm.run(["sinfo", "-h", "-N", "-o", "%N %t"]
                              + (["-p", job.partition] if job.partition else []))
            ok, why = slurm.spare_nodes(sinfo, job, list(exclude_nodes))
            note = why
            if ok:
                excluded = sorted(set(job.excluded) | set(exclude_nodes))
        except slurm.SlurmCommandError as e:
            note = f"cannot check for spare nodes ({e}); requeueing without exclusion"
    if monitor_dir is not None and attempt is not None:
        _write_json(_marker(monitor_dir, "requeued", job_id, attempt),
                    {"by": by, "reason": reason, "exclude": excluded, "time": time.time()})
    if excluded:
        # ExcNodeList only changes on a pending job, so: hold-requeue, update, release. The
        # hold-requeue makes Slurm SIGTERM every process of the job, this one included, and
        # SIGKILL them KillWait seconds later: ignore SIGTERM until the job is released, or it
        # stays held forever (seen on the local cluster).
        try:
            previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:  # not the main thread: nothing to restore
            previous = None
        try:
            slurm.run(["scontrol", "requeuehold", str(job_id)])
            try:
                slurm.run(["scontrol", "update", f"JobId={job_id}",
                           f"ExcNodeList={','.join(excluded)}"])
            finally:
                slurm.run(["scontrol", "release", str(job_id)])
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    else:
        slurm.run(["scontrol", "requeue", str(job_id)])
    if monitor_dir is not None and note:
        record_decision(monitor_dir, job_id=job_id, attempt=attempt, action="exclusion",
                        reason=note, exclude_nodes=excluded, by=by)
    return excluded


def handle_fault(monitor_dir, *, job_id: str | None, attempt: int, fault_kind: str, step: int,
                 cfg: MonitorConfig, culprit_nodes: list[str] = (), culprit_ranks: list[int] = (),
                 by: str, report: str | None = None, job_running: bool = False,
                 rc: int | None = None) -> Decision:
    """Decide and act on one fault, at most once per (job, attempt) across processes.
    ``job_running``: the job is still up (the sidecar's case), so a stop also scancels it;
    ``rc``: srun's exit status, when the caller is the EXIT trap."""
    with _locked(monitor_dir):
        common = dict(job_id=job_id, attempt=attempt, fault_kind=fault_kind, step=step,
                      culprit_ranks=list(culprit_ranks), culprit_nodes=list(culprit_nodes),
                      by=by, report=report, rc=rc)
        stopped = stop_reason(monitor_dir, job_id)
        if stopped:
            d = Decision("stop", f"the restart chain was already stopped: {stopped}")
            record_decision(monitor_dir, action="none", reason=d.reason, **common)
            return d
        who = already_requeued(monitor_dir, job_id, attempt)
        if who:
            d = Decision("none", f"attempt {attempt} was already requeued by {who}")
            record_decision(monitor_dir, action="none", reason=d.reason, **common)
            return d
        if not cfg.act or not job_id:
            d = Decision("none", "report only (no Slurm job id)" if not job_id
                         else "report only (MonitorConfig.act is false)")
            record_decision(monitor_dir, action="none", reason=d.reason, **common)
            return d
        d = decide(read_decisions(monitor_dir), job_id=job_id, attempt=attempt,
                   fault_kind=fault_kind, step=step, cfg=cfg)
        if d.action == "stop":
            _write_json(Path(monitor_dir) / STOP_MARKER,
                        {"reason": d.reason, "job_id": job_id, "attempt": attempt,
                         "time": time.time(), "report": report})
            record_decision(monitor_dir, action="stop", reason=d.reason, **common)
            if job_running:
                try:
                    slurm.run(["scancel", str(job_id)])
                except slurm.SlurmCommandError as e:
                    record_decision(monitor_dir, action="scancel_failed", reason=str(e), **common)
            return d
        exclude = list(culprit_nodes) if cfg.exclude_culprit_nodes else []
        record_decision(monitor_dir, action="requeue", reason=d.reason, **common)
        try:
            excluded = requeue(job_id, d.reason, exclude, monitor_dir=monitor_dir,
                               attempt=attempt, by=by)
        except slurm.SlurmCommandError as e:
            record_decision(monitor_dir, action="requeue_failed", reason=str(e), **common)
            return Decision("none", f"requeue failed: {e}")
        return Decision("requeue", d.reason, tuple(excluded))


# ---------------------------------------------------------------------------- sbatch lines
def setup_lines(monitor_dir: str | os.PathLike, world_size: int,
                cfg: MonitorConfig | None = None, *, python: str | None = None) -> list[str]:
    """Bash lines for submitit's ``setup`` parameter (they run in the batch script on the batch
    host, before ``srun``):

    1. export ``TULU_MONITOR_DIR`` and ``TULU_ATTEMPT`` (srun passes them to every task, so
       ``ProgressTracker.from_env`` finds the monitor);
    2. start the sidecar in the background, its log in the monitor dir;
    3. ``trap 'exit 143' TERM`` (without it, bash killed by Slurm's SIGTERM runs the EXIT trap
       with ``$?`` = 0, the last command's status) and an EXIT trap that passes srun's status
       to ``python -m monitoring.on_exit`` (the crash -> requeue decision), stops the sidecar,
       and exits with on_exit's status.

    Every path is shell-quoted; python is ``sys.executable`` unless given."""
    cfg = cfg or MonitorConfig()
    q = shlex.quote
    py = q(python or sys.executable)
    d = q(str(monitor_dir))
    root = q(str(Path(__file__).resolve().parents[1]))   # so `-m monitoring` imports
    env = f"PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"
    common = (f"--monitor-dir {d} --world-size {int(world_size)} "
              f"--job-id \"${{SLURM_JOB_ID:-}}\" --attempt \"$TULU_ATTEMPT\" "
              f"--config-json {q(cfg.to_json())}")
    log = f"{d}/\"monitor_${{SLURM_JOB_ID:-local}}_${{TULU_ATTEMPT}}.log\""
    return [
        "# tulu-hpc health monitor (monitoring.recovery.setup_lines)",
        f"export TULU_MONITOR_DIR={d}",
        "export TULU_ATTEMPT=\"${SLURM_RESTART_COUNT:-0}\"",
        f"mkdir -p {d}",
        f"{env} {py} -m monitoring.sidecar {common} >> {log} 2>&1 &",
        "TULU_SIDECAR_PID=$!",
        "_tulu_on_exit() {",
        "  local rc=$?",
        "  trap - EXIT TERM",
        f"  {env} {py} -m monitoring.on_exit --rc \"$rc\" --sidecar-pid \"$TULU_SIDECAR_PID\" "
        f"{common} >> {log} 2>&1",
        "  local decided=$?",
        "  kill \"$TULU_SIDECAR_PID\" 2>/dev/null",
        "  exit \"$decided\"",
        "}",
        "trap 'exit 143' TERM",
        "trap _tulu_on_exit EXIT",
    ]
