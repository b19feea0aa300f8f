"""The recovery policy: the ONE place that requeues, stops or cancels a job.

Callers: the sidecar (a hang or a crash it saw while the job runs), `monitoring.on_exit` (the
batch script's EXIT trap, after ``srun`` returned), and the graceful-stop path (through
`request_requeue`, honoured by on_exit). Every decision is appended, with its reason, to
``<monitor_dir>/decisions.jsonl``.

Policy (`decide`, a pure function of the decision history):
- each fault requeue spends one unit of ``max_restarts``; an exhausted budget stops;
- the same fault kind at the same step as the previous fault requeue means the restart made no
  progress: stop, rather than burn the cluster in a loop (NVRx's "do not restart" rule);
- a stop writes ``do_not_requeue.json`` and on_exit exits with `EXIT_DO_NOT_REQUEUE` (79), so
  ``sacct`` shows why the chain ended; a still-running (hung) job is cancelled with scancel;
- a storage fault (ENOSPC, EDQUOT, EROFS, EIO: `monitoring.storage`) is never requeued: the
  restarted job would hit the same full file system. It stops (or, with
  ``MonitorConfig.on_storage_fault="hold"``, requeues the job *held*: ``scontrol release`` once
  space is free) with the path, the bytes and how to resume in the reason, which also goes to
  the Slurm job's comment (readable when no file can be written).

Nothing here dies of an I/O error: records go through `monitoring.storage.files_for` (the
monitor dir, else the fallback folder); a decision that could be written nowhere is still acted
on and kept in memory for the rest of the process.

Requeue with exclusion: Slurm changes ``ExcNodeList`` only while a job is pending, so the
sequence is ``scontrol requeuehold J`` -> ``scontrol update JobId=J ExcNodeList=...`` ->
``scontrol release J``, and only when `monitoring.slurm.spare_nodes` says the partition can
still place the job without the culprit's node(s); otherwise a plain ``scontrol requeue J``.

Double requeues are avoided under a file lock: a marker ``requeued/<job>_<attempt>.json`` is
written by every requeue made here, once Slurm accepted it (each ``scontrol`` is retried with
a back-off; when every try failed nothing is marked, the failure is recorded and said on
stderr, and the EXIT trap tries again), and ``scontrol show job`` tells whether someone else
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
from typing import Callable, Iterator

from monitoring import injob, slurm
from monitoring.config import MonitorConfig
from monitoring.injob import RESTARTABLE
from monitoring.storage import files_for, say

__all__ = ["EXIT_DO_NOT_REQUEUE", "EXIT_REQUEUE_FAILED", "RequeueFailed", "Decision", "decide",
           "handle_fault", "requeue", "request_requeue", "requeue_requested",
           "report_requeue_failure", "already_requeued", "stop_reason", "read_decisions",
           "record_decision", "settle_pending_requeues", "setup_lines", "step_loop_lines",
           "set_comment", "AGENTS_STEP"]

EXIT_DO_NOT_REQUEUE = 79
STOP_MARKER = "do_not_requeue.json"
NOT_COUNTED = ("requested",)   # requeues that do not spend the fault budget (preemption etc.)


@dataclass(frozen=True, slots=True)
class Decision:
    action: str                   # "restart" | "requeue" | "stop" | "hold" | "none" | "requeue_failed"
    reason: str
    exclude_nodes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- the policy
COUNTED = ("requeue", "restart")   # what spends ``max_restarts`` and what the no-progress guard sees


def decide(history: list[dict], *, job_id: str | None, attempt: int, fault_kind: str,
           step: int, cfg: MonitorConfig, storage_line: str = "", spares_left: int = 0,
           spares_needed: int = 0) -> Decision:
    """Restart in the job, requeue or stop after ``fault_kind`` at ``step`` (the highest step
    any rank finished). ``storage_line``: a storage fault's one-line description (kind
    "storage"). ``spares_left``: spare nodes the allocation still holds (0: requeue only);
    ``spares_needed``: how many replacing the culprits' nodes takes (at least one is used)."""
    if fault_kind == "storage":
        what = storage_line or "the run folder's file system cannot be written"
        if cfg.on_storage_fault == "hold":
            return Decision("hold", f"storage: {what}; not requeued into a full file system: the "
                                    f"job is held. Free space (or raise the quota), then `scontrol "
                                    f"release {job_id}`: it resumes from its last committed checkpoint")
        return Decision("stop", f"storage: {what}; not requeued into a full file system. Free "
                                f"space (or raise the quota), then resubmit the same config (tulu "
                                f"submit): it resumes from its last committed checkpoint")
    mine = [d for d in history if d.get("job_id") == job_id and d.get("action") in COUNTED
            and d.get("fault_kind") not in NOT_COUNTED]
    if len(mine) >= cfg.max_restarts:
        return Decision("stop", f"restart budget exhausted: {len(mine)} fault restart(s) and "
                                f"requeue(s) of {cfg.max_restarts} already used (MonitorConfig."
                                f"max_restarts); last fault: {fault_kind} at step {step}")
    previous = [d for d in mine if d.get("attempt", -1) < attempt]
    repeat = None
    if previous:
        last = previous[-1]
        if last.get("fault_kind") == fault_kind and last.get("step") == step:
            repeat = last
    if repeat is not None and repeat.get("action") == "requeue":
        return Decision("stop", f"no progress since the previous restart: the same fault "
                                f"({fault_kind}) at the same step ({step}) as attempt "
                                f"{repeat.get('attempt')}; requeueing again would loop. "
                                f"Read the reports, fix the cause, resubmit")
    count = f"{len(mine) + 1}/{cfg.max_restarts}"
    if repeat is not None:   # after an in-job restart: one try in a fresh allocation
        return Decision("requeue", f"{fault_kind} at step {step} again after the in-job restart "
                                   f"of attempt {repeat.get('attempt')}: requeue into a fresh "
                                   f"allocation {count}")
    if fault_kind in RESTARTABLE and spares_left >= max(1, spares_needed):
        return Decision("restart", f"{fault_kind} at step {step}: restart in the job on a spare "
                                   f"node {count} ({spares_left} spare(s) left)")
    why = "" if not spares_left else f" ({fault_kind}: not restartable in the job)"
    if not spares_left and any(d.get("action") == "restart" for d in mine):
        why = " (no spare node left)"
    return Decision("requeue", f"{fault_kind} at step {step}: requeue {count}{why}")


# ---------------------------------------------------------------------------- records
@contextmanager
def _locked(monitor_dir) -> Iterator[None]:
    """An exclusive lock shared by the sidecar and the EXIT trap: in the monitor dir, else in
    the fallback folder (a lock file holds no data, but a read-only or failing file system
    refuses even that); without either, go on unlocked rather than not decide."""
    f = None
    for path in files_for(monitor_dir).candidates(Path(monitor_dir) / ".recovery.lock"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a")
            break
        except OSError:
            continue
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_unwritten: list[dict] = []   # decisions this process could write nowhere (still honoured)


def read_decisions(monitor_dir) -> list[dict]:
    out = []
    for line in files_for(monitor_dir).read_lines(Path(monitor_dir) / "decisions.jsonl"):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write
    out += [d for d in _unwritten if d not in out]
    return sorted(out, key=lambda d: d.get("time", 0))


def record_decision(monitor_dir, **entry) -> dict:
    entry = {"time": time.time(), **entry}
    line = json.dumps(entry, sort_keys=True) + "\n"
    if files_for(monitor_dir).append_line(Path(monitor_dir) / "decisions.jsonl", line,
                                          what="decision record") is None:
        _unwritten.append(entry)
        say(f"[monitor] decision not written anywhere (file system?): {line.strip()}")
    return entry


def _write_json(monitor_dir, path: Path, data: dict) -> Path | None:
    return files_for(monitor_dir).write_text(path, json.dumps(data, sort_keys=True),
                                             what=path.name)


def _read_json(path: Path, monitor_dir) -> dict | None:
    text = files_for(monitor_dir).read_text(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def set_comment(job_id: str | None, text: str) -> bool:
    """Put ``text`` (cut to 250 characters) in the Slurm job's comment: readable with
    ``scontrol show job`` / ``tulu status`` when no file can be written."""
    if not job_id:
        return False
    clean = " ".join(text.split())[:250]
    try:
        slurm.run(["scontrol", "update", f"JobId={job_id}", f"Comment={clean}"], timeout=20)
        return True
    except slurm.SlurmCommandError as e:
        say(f"[monitor] could not set the job comment: {e}")
        return False


def _marker(monitor_dir, kind: str, job_id, attempt) -> Path:
    return Path(monitor_dir) / kind / f"{job_id or 'local'}_{attempt}.json"


def stop_reason(monitor_dir, job_id: str | None = None) -> str | None:
    """Why job ``job_id``'s restart chain was stopped (any job's if None), or None. A new
    submission (another job id) into the same folder is not blocked."""
    data = _read_json(Path(monitor_dir) / STOP_MARKER, monitor_dir)
    if data is None:
        return None
    if job_id is not None and data.get("job_id") not in (None, job_id):
        return None
    return data.get("reason", "stopped")


def already_requeued(monitor_dir, job_id: str | None, attempt: int) -> str | None:
    """Who already requeued this attempt ("monitor", "slurm: Restarts=N"), or None."""
    m = _marker(monitor_dir, "requeued", job_id, attempt)
    if files_for(monitor_dir).exists(m):
        data = _read_json(m, monitor_dir)
        return f"monitor ({data.get('by', '?')})" if data else "monitor"
    if job_id:
        try:
            info = slurm.show_job(job_id)
        except slurm.SlurmCommandError:
            return None
        base = injob.slurm_restarts_at_start(attempt)
        if info.restarts > base:
            return (f"slurm: Restarts={info.restarts} > {base} when attempt {attempt} started "
                    f"(submitit or a user)")
    return None


def request_requeue(monitor_dir, job_id: str | None, attempt: int, reason: str) -> None:
    """Graceful-stop path (preemption, time limit): the ranks saved and will exit 0; ask the
    EXIT trap (on_exit) to requeue once srun has returned. Does not spend the fault budget."""
    _write_json(monitor_dir, _marker(monitor_dir, "requeue_requested", job_id, attempt),
                {"reason": reason, "time": time.time(), "pid": os.getpid()})


def requeue_requested(monitor_dir, job_id: str | None, attempt: int) -> str | None:
    data = _read_json(_marker(monitor_dir, "requeue_requested", job_id, attempt), monitor_dir)
    return data.get("reason", "requested") if data else None


# ---------------------------------------------------------------------------- actions
REQUEUE_TRIES = 4          # scontrol tries per action: slurmctld may be briefly unreachable
REQUEUE_BACKOFF_S = 2.0    # 2, 4, 8 s between them (14 s in all, within on_exit's wait)
EXIT_REQUEUE_FAILED = 78   # on_exit's status when every requeue try failed (sacct shows it)


class RequeueFailed(slurm.SlurmCommandError):
    """Every ``scontrol`` try of a requeue failed: the job was NOT requeued."""


def _slurm_requeued(job_id: str, attempt: int | None):
    """A check for `slurm.run_retrying`: did an earlier try requeue the job after all?"""
    if attempt is None:
        return None
    base = injob.slurm_restarts_at_start(attempt)
    return lambda: slurm.show_job(job_id).restarts > base


@contextmanager
def _sigterm_ignored() -> Iterator[None]:
    """A requeue makes Slurm SIGTERM every process of the job, the caller included: ignore it
    until the action is complete and recorded (the marker, the decision), or a held job stays
    held forever and the marker is never written (both seen on the local cluster)."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to restore
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def requeue(job_id: str, reason: str, exclude_nodes: list[str] | tuple[str, ...] = (), *,
            monitor_dir=None, attempt: int | None = None, by: str = "",
            decision: dict | None = None) -> list[str]:
    """Requeue ``job_id``, excluding ``exclude_nodes`` when the partition has spare nodes.
    Returns the nodes actually excluded.

    Each ``scontrol`` runs up to `REQUEUE_TRIES` times with a back-off (`slurm.run_retrying`).
    Only once Slurm accepted the requeue, and with ``monitor_dir``, this attempt's requeued
    marker is written and ``decision`` (a decision record) appended: a marker never claims a
    requeue that did not happen, so the EXIT trap still tries when this one failed. When every
    try failed: `RequeueFailed`, naming each try's error."""
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
    retry = dict(tries=REQUEUE_TRIES, backoff_s=REQUEUE_BACKOFF_S)
    pending = None
    if monitor_dir is not None and decision is not None and attempt is not None:
        # Kept until the decision is recorded: if this process is killed in between (see
        # below), the next attempt's monitor records it (`settle_pending_requeues`).
        pending = _marker(monitor_dir, "pending_requeue", job_id, attempt)
        _write_json(monitor_dir, pending, {"time": time.time(), **decision})
    with _sigterm_ignored():
        try:
            if excluded:
                # ExcNodeList only changes on a pending job, so: hold-requeue, update, release.
                slurm.run_retrying(["scontrol", "requeuehold", str(job_id)],
                                   done=_slurm_requeued(job_id, attempt), **retry)
            else:
                slurm.run_retrying(["scontrol", "requeue", str(job_id)],
                                   done=_slurm_requeued(job_id, attempt), **retry)
        except slurm.SlurmCommandError as e:
            if pending is not None:
                files_for(monitor_dir).unlink(pending)
            raise RequeueFailed(f"job {job_id} was NOT requeued: {e}") from e
        # The decision first: when the EXIT trap requeues, the requeue's SIGTERM ends the batch
        # script, and Slurm then kills what is left of the job (this process) within
        # milliseconds; the marker has a fallback (``Restarts`` > attempt), the record none.
        if monitor_dir is not None and decision is not None:
            record_decision(monitor_dir, **decision)
        if monitor_dir is not None and attempt is not None:
            _write_json(monitor_dir, _marker(monitor_dir, "requeued", job_id, attempt),
                        {"by": by, "reason": reason, "exclude": excluded, "time": time.time()})
        if pending is not None:
            files_for(monitor_dir).unlink(pending)
        if excluded:
            try:
                try:
                    slurm.run_retrying(["scontrol", "update", f"JobId={job_id}",
                                        f"ExcNodeList={','.join(excluded)}"], **retry)
                finally:
                    slurm.run_retrying(["scontrol", "release", str(job_id)], **retry)
            except slurm.SlurmCommandError as e:
                # Requeued but maybe still held: say so loudly; the marker stands (the attempt
                # is requeued, a second requeue would fail on a pending job anyway).
                msg = (f"job {job_id} was requeued held, but excluding {excluded} or releasing "
                       f"it failed ({e}): if `squeue` shows it held, `scontrol release {job_id}`")
                _shout(f"[monitor] {msg}")
                if monitor_dir is not None:
                    record_decision(monitor_dir, job_id=job_id, attempt=attempt,
                                    action="release_failed", reason=msg, by=by)
                raise
        if monitor_dir is not None and note:
            record_decision(monitor_dir, job_id=job_id, attempt=attempt, action="exclusion",
                            reason=note, exclude_nodes=excluded, by=by)
    return excluded


def settle_pending_requeues(monitor_dir, job_id: str | None, attempt: int) -> list[dict]:
    """Record the requeues of earlier attempts whose maker was killed between ``scontrol``
    and its record (this attempt runs, so they happened): their ``pending_requeue`` files,
    unless a requeue of that attempt is recorded already. Returns the records written."""
    done = []
    if not job_id:
        return done
    recorded = {(d.get("job_id"), d.get("attempt")) for d in read_decisions(monitor_dir)
                if d.get("action") == "requeue"}
    for a in range(attempt):
        path = _marker(monitor_dir, "pending_requeue", job_id, a)
        entry = _read_json(path, monitor_dir)
        if entry is None:
            continue
        if (job_id, a) not in recorded:
            done.append(record_decision(monitor_dir, **{**entry, "settled_by_attempt": attempt}))
        files_for(monitor_dir).unlink(path)
    return done


def report_requeue_failure(monitor_dir, error: Exception, **entry) -> str:
    """A requeue that failed every try: a decision record and a line on stderr (the caller also
    exits with a status that says so). Returns the reason."""
    reason = (f"REQUEUE FAILED after {REQUEUE_TRIES} tries: {error}. The job was not requeued; "
              f"resubmit it (it resumes from its last committed checkpoint)")
    _shout(f"[monitor] {reason}")
    record_decision(monitor_dir, action="requeue_failed", reason=reason, **entry)
    return reason


def _shout(msg: str) -> None:
    """A line on stderr (the batch log, whatever stdout is); stdout if stderr refuses it."""
    try:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        say(msg)


def handle_fault(monitor_dir, *, job_id: str | None, attempt: int, fault_kind: str, step: int,
                 cfg: MonitorConfig, culprit_nodes: list[str] = (), culprit_ranks: list[int] = (),
                 by: str, report: str | None = None, job_running: bool = False,
                 rc: int | None = None, storage_line: str = "",
                 stop_ranks: Callable[[], list[str]] | None = None,
                 may_restart: bool = False,
                 stop_step: Callable[[], list[str]] | None = None) -> Decision:
    """Decide and act on one fault, at most once per (job, attempt) across processes.
    ``stop_ranks``: called once a requeue is decided, before it is made, to SIGKILL the
    attempt's ranks (the sidecar's); returns what it killed, kept in the decision record.
    ``may_restart``: the caller's batch script runs the step loop and will start a next step
    (the sidecar, and on_exit called by the loop; not the EXIT trap): with a spare node left
    (`monitoring.injob`) the decision may be "restart": ``stop_step`` (SIGKILL the training
    step, the agents' step spared) is called, the culprit's node is swapped for a spare, the
    attempt bumped, and the loop starts the next step.
    ``job_running``: the job is still up (the sidecar's case), so a stop also scancels it;
    ``rc``: srun's exit status, when the caller is the EXIT trap; ``storage_line``: a storage
    fault's one-line description (kind "storage")."""
    with _locked(monitor_dir):
        common = dict(job_id=job_id, attempt=attempt, fault_kind=fault_kind, step=step,
                      culprit_ranks=list(culprit_ranks), culprit_nodes=list(culprit_nodes),
                      by=by, report=report, rc=rc)
        stopped = stop_reason(monitor_dir, job_id)
        if stopped:
            d = Decision("stop", f"the restart chain was already stopped: {stopped}")
            record_decision(monitor_dir, action="none", reason=d.reason, **common)
            return d
        if may_restart:
            done = injob.restarted(monitor_dir, job_id, attempt)
            if done:
                d = Decision("restart", f"attempt {attempt} was already restarted in the job: "
                                        f"{done.get('reason', '')}")
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
        exclude = list(culprit_nodes) if cfg.exclude_culprit_node else []
        d = decide(read_decisions(monitor_dir), job_id=job_id, attempt=attempt,
                   fault_kind=fault_kind, step=step, cfg=cfg, storage_line=storage_line,
                   spares_left=injob.spares_left(monitor_dir, job_id, attempt) if may_restart else 0,
                   spares_needed=injob.needed_spares(monitor_dir, job_id, exclude))
        if d.action == "restart":
            done = _restart_in_job(monitor_dir, d, common, exclude, stop_step)
            if done is not None:
                return done
            d = Decision("requeue", f"{d.reason}; the in-job restart failed: requeue instead")
        if fault_kind == "storage":
            set_comment(job_id, f"tulu monitor: {d.reason}")
        if d.action == "hold":
            record_decision(monitor_dir, action="hold", reason=d.reason, **common)
            try:
                with _sigterm_ignored():
                    slurm.run_retrying(["scontrol", "requeuehold", str(job_id)],
                                       tries=REQUEUE_TRIES, backoff_s=REQUEUE_BACKOFF_S,
                                       done=_slurm_requeued(job_id, attempt))
                    _write_json(monitor_dir, _marker(monitor_dir, "requeued", job_id, attempt),
                                {"by": by, "reason": d.reason, "hold": True, "time": time.time()})
            except slurm.SlurmCommandError as e:
                _shout(f"[monitor] requeuehold FAILED: {e}")
                record_decision(monitor_dir, action="hold_failed", reason=str(e), **common)
                return Decision("none", f"requeuehold failed: {e}")
            return d
        if d.action == "stop":
            _write_json(monitor_dir, Path(monitor_dir) / STOP_MARKER,
                        {"reason": d.reason, "job_id": job_id, "attempt": attempt,
                         "time": time.time(), "report": report})
            record_decision(monitor_dir, action="stop", reason=d.reason, **common)
            # A storage fault is seen on failed ranks: srun is taking the step down already, and
            # the EXIT trap must see the stop (exit 79, the reason in sacct), not a cancellation.
            if job_running and fault_kind != "storage":
                try:
                    slurm.run(["scancel", str(job_id)])
                except slurm.SlurmCommandError as e:
                    record_decision(monitor_dir, action="scancel_failed", reason=str(e), **common)
            return d
        killed: list[str] = []
        if stop_ranks is not None:
            # Before the requeue: its SIGTERM comes with a SIGCONT, and a SIGSTOPped rank
            # would run on (steps, checkpoints) until KillWait's SIGKILL.
            try:
                killed = stop_ranks()
            except Exception as e:  # noqa: BLE001 - never let this block the requeue
                killed = [f"failed: {type(e).__name__}: {e}"]
        try:
            excluded = requeue(job_id, d.reason, exclude, monitor_dir=monitor_dir,
                               attempt=attempt, by=by,
                               decision=dict(action="requeue", reason=d.reason, **common,
                                             **({"killed": killed} if stop_ranks else {})))
        except RequeueFailed as e:
            return Decision("requeue_failed", report_requeue_failure(monitor_dir, e, **common))
        except slurm.SlurmCommandError as e:   # requeued, but held: the record says so
            return Decision("requeue", f"{d.reason}; {e}")
        return Decision("requeue", d.reason, tuple(excluded))


def _restart_in_job(monitor_dir, d: Decision, common: dict, exclude: list[str],
                    stop_step: Callable[[], list[str]] | None) -> Decision | None:
    """Act on a "restart": SIGKILL the training step (a hung step never ends by itself), swap
    the culprits' nodes for spares and bump the attempt (`injob.restart`: the step loop's cue),
    record. None when the state cannot be written: the caller requeues instead."""
    killed: list[str] = []
    if stop_step is not None:
        try:
            killed = stop_step()
        except Exception as e:  # noqa: BLE001 - the restart (or the requeue) must still happen
            killed = [f"failed: {type(e).__name__}: {e}"]
    try:
        state = injob.restart(monitor_dir, common["job_id"], common["attempt"], exclude, d.reason)
    except (OSError, ValueError) as e:
        _shout(f"[monitor] in-job restart impossible ({e}); requeueing instead")
        record_decision(monitor_dir, action="restart_failed", reason=str(e), **common)
        return None
    swaps = state["swaps"]
    record_decision(monitor_dir, action="restart", reason=d.reason, **common, killed=killed,
                    swaps=swaps, next_attempt=state["attempt"], active=state["active"],
                    exclude_nodes=[s["node"] for s in swaps])
    return Decision("restart", d.reason, tuple(s["node"] for s in swaps))


# ---------------------------------------------------------------------------- sbatch lines
AGENTS_STEP = "tulu-monitor-agents"   # the agents' srun step: an in-job restart spares it


# Stamped into every rank's record (`monitoring.record.read_all`): this batch script's records,
# never those a job that ended a second ago left in the same run folder. One per allocation:
# in-job restarts keep it (the attempt tells them apart); a requeue runs the script again.
SESSION_LINE = "export TULU_MONITOR_SESSION=\"${SLURM_JOB_ID:-local}.$$.$(date +%s%N)\""


def setup_lines(monitor_dir: str | os.PathLike, world_size: int,
                cfg: MonitorConfig | None = None, *, python: str | None = None,
                train_nodes: int = 0, spare_nodes: int = 0) -> list[str]:
    """Bash lines for submitit's ``setup`` parameter (they run in the batch script on the batch
    host, before ``srun``):

    1. export ``TULU_MONITOR_DIR`` and ``TULU_ATTEMPT`` (srun passes them to every task, so
       ``ProgressTracker.from_env`` finds the monitor), ``TULU_MONITOR_SESSION`` (each rank
       stamps it into its record) and ``TULU_MONITOR_START`` (unstamped records older than it
       were left by an earlier job in the same run folder);
    2. start the sidecar in the background, its log in the monitor dir; under Slurm also one
       monitor agent per node (`monitoring.agent`: one ``srun --overlap`` step, its log beside
       the sidecar's), which reads its node's pids and stacks for the sidecar;
    3. ``trap 'exit 143' TERM`` (without it, bash killed by Slurm's SIGTERM runs the EXIT trap
       with ``$?`` = 0, the last command's status) and an EXIT trap that passes srun's status
       to ``python -m monitoring.on_exit`` (the crash -> requeue decision), stops the sidecar,
       and exits with on_exit's status (the agents' step ends with it, or with the job).

    With ``spare_nodes`` (``cluster.spare_nodes``; ``train_nodes`` is ``cluster.nodes``) the
    attempt comes from `monitoring.injob` (``python -m monitoring.injob start``: the first
    ``train_nodes`` of the allocation are active, the rest spares), ``_tulu_start_sidecar`` and
    ``_tulu_decide`` are defined for the step loop (`step_loop_lines`), and the EXIT trap does
    not decide again what the loop decided (``TULU_DECIDED``).

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
    agent_log = f"{d}/\"agents_${{SLURM_JOB_ID:-local}}_${{TULU_ATTEMPT}}.log\""
    # One task per node, sharing the job's CPUs and memory (--overlap), no stdin, never
    # ending the job (--kill-on-bad-exit=0); the main step does not wait for it. srun's own
    # messages go to the agents' log: "task 1: Killed" in the batch log would blame a rank.
    agents = (f"srun --overlap --nodes=\"$SLURM_JOB_NUM_NODES\" --ntasks=\"$SLURM_JOB_NUM_NODES\" "
              f"--ntasks-per-node=1 --cpus-per-task=1 --mem-per-cpu=0 --kill-on-bad-exit=0 "
              f"--job-name={AGENTS_STEP} --output={agent_log} --open-mode=append --input=none "
              f"env {env} {py} -m monitoring.agent {common} </dev/null 2>> {agent_log} &")
    sidecar = (f"{env} {py} -m monitoring.sidecar {common} --node \"${{SLURMD_NODENAME:-}}\" "
               f">> {log} 2>&1 &")
    on_exit = f"{env} {py} -m monitoring.on_exit --rc \"$rc\" --sidecar-pid \"$TULU_SIDECAR_PID\" {common} >> {log} 2>&1"
    if not spare_nodes:
        return [
            "# tulu-hpc health monitor (monitoring.recovery.setup_lines)",
            f"export TULU_MONITOR_DIR={d}",
            "export TULU_ATTEMPT=\"${SLURM_RESTART_COUNT:-0}\"",
            "export TULU_MONITOR_START=\"$(date +%s)\"",
            SESSION_LINE,
            # srun's verdicts accumulate in this log across requeues: mark where an attempt starts
            "echo \"tulu-hpc monitor: attempt $TULU_ATTEMPT of job ${SLURM_JOB_ID:-local} starts\" >&2",
            f"mkdir -p {d}",
            sidecar,
            "TULU_SIDECAR_PID=$!",
            "TULU_AGENTS_PID=",
            f"if [ -n \"${{SLURM_JOB_ID:-}}\" ]; then {agents} TULU_AGENTS_PID=$!; fi",
            "_tulu_on_exit() {",
            "  local rc=$?",
            "  trap - EXIT TERM",
            f"  {on_exit}",
            "  local decided=$?",
            "  kill \"$TULU_SIDECAR_PID\" $TULU_AGENTS_PID 2>/dev/null",
            "  exit \"$decided\"",
            "}",
            "trap 'exit 143' TERM",
            "trap _tulu_on_exit EXIT",
        ]
    injob_start = (f"{env} {py} -m monitoring.injob start --monitor-dir {d} "
                   f"--job-id \"$SLURM_JOB_ID\" --nodes {int(train_nodes)}")
    return [
        f"# tulu-hpc health monitor with {int(spare_nodes)} spare node(s) "
        "(monitoring.recovery.setup_lines)",
        f"export TULU_MONITOR_DIR={d}",
        f"mkdir -p {d}",
        # Slurm's count when this allocation started ("was this attempt requeued?" compares
        # with it); the attempt counts in-job restarts too (monitoring.injob)
        "export TULU_SLURM_RESTARTS=\"${SLURM_RESTART_COUNT:-0}\"",
        f"TULU_ATTEMPT=\"$({injob_start})\" || {{ echo \"tulu-hpc: the in-job restart state could "
        "not be set up (above); the job ends\" >&2; exit 1; }",
        "export TULU_ATTEMPT",
        "export TULU_MONITOR_START=\"$(date +%s)\"",
        SESSION_LINE,
        "echo \"tulu-hpc monitor: attempt $TULU_ATTEMPT of job ${SLURM_JOB_ID:-local} starts\" >&2",
        f"_tulu_start_sidecar() {{ {sidecar} TULU_SIDECAR_PID=$!; }}",
        "_tulu_start_sidecar",
        "TULU_AGENTS_PID=",
        f"if [ -n \"${{SLURM_JOB_ID:-}}\" ]; then {agents} TULU_AGENTS_PID=$!; fi",
        # the step loop's verdict after each step: EXIT_RESTART (80) starts the next step
        "_tulu_decide() {",
        "  local rc=$1",
        f"  {on_exit.replace('--rc ', '--may-restart --rc ', 1)}",
        "}",
        "_tulu_on_exit() {",
        "  local rc=$?",
        "  trap - EXIT TERM",
        "  local decided=\"${TULU_DECIDED:-}\"",
        "  if [ -z \"$decided\" ]; then",
        f"    {on_exit}",
        "    decided=$?",
        "  fi",
        "  kill \"$TULU_SIDECAR_PID\" $TULU_AGENTS_PID 2>/dev/null",
        "  exit \"$decided\"",
        "}",
        "trap 'exit 143' TERM",
        "trap _tulu_on_exit EXIT",
    ]


def step_loop_lines(srun_line: str, monitor_dir: str | os.PathLike, *, nodes: int,
                    tasks_per_node: int) -> list[str]:
    """The batch script's training step inside the in-job restart loop (``cluster.spare_nodes``
    > 0; `setup_lines` with ``spare_nodes`` defines the functions it calls). ``srun_line`` is
    submitit's ``srun ...`` line: it runs on exactly ``nodes`` nodes, the active list of
    `monitoring.injob`. After each step ``_tulu_decide`` (on_exit ``--may-restart``) says what
    srun's status means: `injob.EXIT_RESTART` (a restart was decided, by the sidecar for a hang
    or right there for a crash) starts the next step on the new list with the next attempt
    (the old sidecar is stopped, a new one watches); anything else is the job's final status
    (the EXIT trap then only cleans up)."""
    if not srun_line.startswith("srun "):
        raise ValueError(f"not an srun line: {srun_line[:80]!r}")
    d = shlex.quote(str(monitor_dir))
    state = f"{d}/{injob.INJOB}/\"$SLURM_JOB_ID\""
    step = (f"srun --nodes={int(nodes)} --ntasks={int(nodes) * int(tasks_per_node)} "
            f"--ntasks-per-node={int(tasks_per_node)} --nodelist=\"$(cat {state}.nodes)\" "
            + srun_line[len("srun "):])
    return [
        "# tulu-hpc in-job restart loop (monitoring.recovery.step_loop_lines): the training step",
        "# runs on the active nodes; a restart swaps the culprit's node for a spare",
        "while :; do",
        f"  {step}",
        "  TULU_RC=$?",
        "  _tulu_decide \"$TULU_RC\"",
        "  TULU_DECIDED=$?",
        f"  [ \"$TULU_DECIDED\" -eq {injob.EXIT_RESTART} ] || exit \"$TULU_DECIDED\"",
        "  TULU_DECIDED=",
        "  kill \"$TULU_SIDECAR_PID\" 2>/dev/null",
        f"  TULU_ATTEMPT=\"$(cat {state}.attempt)\"",
        "  export TULU_ATTEMPT",
        f"  echo \"tulu-hpc monitor: attempt $TULU_ATTEMPT of job $SLURM_JOB_ID starts in the job "
        f"on $(cat {state}.nodes) (in-job restart)\" >&2",
        "  _tulu_start_sidecar",
        "done",
    ]
