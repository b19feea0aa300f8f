"""The batch script's EXIT trap: decide what srun's exit status means for the job.

    python -m monitoring.on_exit --rc RC --monitor-dir D --world-size N [--job-id J]
                                 [--attempt A] [--sidecar-pid P] [--config-json JSON]

When ``srun`` returns (a task crashed and ``--kill-on-bad-exit`` took the step down, or
everything finished), the batch script ends and Slurm kills every process of the job, the
sidecar included; so the crash -> requeue decision is taken here, in the script's EXIT trap
(installed by `monitoring.recovery.setup_lines`).

1. If the sidecar is busy with a fault (``sidecar_busy.json``), wait up to
   ``sidecar_wait_s`` for its verdict: one decision per attempt.
2. rc 0: the job finished, unless the graceful-stop path asked for a requeue
   (`recovery.request_requeue`), which is honoured without spending the fault budget.
3. rc != 0: nothing to do if the job was cancelled (``JobState=CANCELLED``), or this attempt
   was already requeued (by the sidecar, or by submitit: ``Restarts`` > attempt). Otherwise a
   crash report (records + logs: srun's "task 3: Exited with exit code 3" names the task)
   and `recovery.handle_fault`.

With ``--may-restart`` (the step loop of a job with spare nodes, `recovery.step_loop_lines`)
a restart decided for this attempt (by the sidecar, or here for a crash while a spare is left)
exits `injob.EXIT_RESTART` (80): the loop starts the next step inside the allocation.

Exit status (the batch script's final status): srun's rc, `EXIT_DO_NOT_REQUEUE` (79) when
the restart chain was stopped, or `EXIT_REQUEUE_FAILED` (78) when a requeue was decided but
every ``scontrol`` try failed (the reason is in ``decisions.jsonl`` and on stderr). A sidecar
whose requeue failed left no requeued marker, so this hook tries again. An I/O error never
ends it before it decides: records it cannot write go to the fallback folder
(`monitoring.storage`), and a storage fault (ENOSPC, EDQUOT, EROFS, EIO) is named in the report
and the job's comment and never requeued.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from monitoring import injob, slurm
from monitoring.config import MonitorConfig
from monitoring.detect import Fault
from monitoring.diagnosis import diagnose, write_report
from monitoring.record import STATE_FAILED, monitor_session, monitor_start, read_all
from monitoring.recovery import (
    EXIT_DO_NOT_REQUEUE, EXIT_REQUEUE_FAILED, RequeueFailed, already_requeued, handle_fault,
    record_decision, report_requeue_failure, requeue, requeue_requested, stop_reason,
)
from monitoring.sidecar import BUSY, job_settings, log
from monitoring import storage

__all__ = ["decide_on_exit", "main"]


def _wait_for_sidecar(monitor_dir: Path, pid: int | None, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    io = storage.files_for(monitor_dir)
    while io.exists(monitor_dir / BUSY) and time.monotonic() < deadline:
        if pid and not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.2)


def decide_on_exit(rc: int, monitor_dir: str | os.PathLike, world_size: int,
                   cfg: MonitorConfig, *, job_id: str | None, attempt: int,
                   sidecar_pid: int | None = None, may_restart: bool = False) -> int:
    """``may_restart``: called by the batch script's step loop (``cluster.spare_nodes``), which
    starts a next step on `injob.EXIT_RESTART`: a restart the sidecar decided for this attempt
    is passed on, and a crash may be restarted in the job on a spare node."""
    d = Path(monitor_dir)
    _wait_for_sidecar(d, sidecar_pid, cfg.sidecar_wait_s)
    base = dict(job_id=job_id, attempt=attempt, by="on_exit", rc=rc)

    stopped = stop_reason(d, job_id)
    if stopped:
        log(f"srun exited {rc}; restart chain already stopped: {stopped}")
        if stopped.startswith("storage:"):
            _clean_after_storage_fault(cfg, job_id)
        return EXIT_DO_NOT_REQUEUE

    if may_restart:
        done = injob.restarted(d, job_id, attempt)
        if done:
            log(f"srun exited {rc}; attempt {attempt} restarts in the job as attempt "
                f"{done.get('next_attempt')} on {','.join(done.get('active', []))}",
                swaps=done.get("swaps"))
            return injob.EXIT_RESTART

    asked = requeue_requested(d, job_id, attempt)
    if asked and not already_requeued(d, job_id, attempt) and job_id and cfg.act:
        try:
            requeue(job_id, asked, monitor_dir=d, attempt=attempt, by="on_exit",
                    decision=dict(action="requeue", fault_kind="requested", reason=asked, **base))
            log(f"srun exited {rc}; requeued as requested: {asked}")
        except RequeueFailed as e:
            log(report_requeue_failure(d, e, fault_kind="requested", **base))
            return EXIT_REQUEUE_FAILED
        except slurm.SlurmCommandError as e:
            log(f"requested requeue: {e}")
        return rc

    if rc == 0:
        record_decision(d, action="none", reason="srun exited 0: job finished", **base)
        log("srun exited 0: job finished")
        return 0

    info = None
    if job_id:
        try:
            info = slurm.show_job(job_id)
        except slurm.SlurmCommandError as e:
            log(f"cannot read the job's state: {e}")
    if info is not None and info.state == "CANCELLED":
        record_decision(d, action="none", reason=f"srun exited {rc}: job was cancelled", **base)
        log(f"srun exited {rc}: the job was cancelled; not requeueing")
        return rc
    who = already_requeued(d, job_id, attempt)
    if who:
        record_decision(d, action="none", reason=f"srun exited {rc}; attempt {attempt} already "
                        f"requeued by {who}", **base)
        log(f"srun exited {rc}; already requeued by {who}")
        return rc

    records = read_all(d, world_size, since=monitor_start(), session=monitor_session())
    records = [r if r is not None and r.attempt == attempt else None for r in records]
    failed = tuple(r.rank for r in records if r is not None and r.state == STATE_FAILED)
    why = f"srun exited with status {rc}" + (
        f" (job state {info.state})" if info is not None else "")
    # A time limit or preemption that nobody handled gracefully is requeued like a crash (the
    # run resumes from its last checkpoint), under its own name so that "the same fault at
    # the same step twice" still ends a loop that makes no progress.
    kind = {"TIMEOUT": "timeout", "PREEMPTED": "preempted", "NODE_FAIL": "node_fail"}.get(
        info.state if info is not None else "", "crash")
    fault = Fault("crash", failed, detail=why)
    report = diagnose(fault, records, monitor_dir=d, cfg=cfg, job_id=job_id, attempt=attempt,
                      collect=False)
    path = write_report(d, report)
    log(f"report {path or '(written nowhere: text on stdout/stderr)'}: {report.summary}")
    step = max((r.done_step for r in records if r is not None), default=-1)
    if report.kind == "storage":
        kind = "storage"
        _clean_after_storage_fault(cfg, job_id)
    decision = handle_fault(
        d, job_id=job_id, attempt=attempt, fault_kind=kind, step=step, cfg=cfg,
        culprit_nodes=report.culprit_nodes, culprit_ranks=[c["rank"] for c in report.culprits],
        by="on_exit", report=str(path) if path else None, job_running=False, rc=rc,
        storage_line=report.storage.get("line", ""), may_restart=may_restart)
    log(f"decision: {decision.action}: {decision.reason}", exclude=list(decision.exclude_nodes))
    if decision.action == "restart":
        return injob.EXIT_RESTART
    if decision.action == "requeue_failed":
        return EXIT_REQUEUE_FAILED
    return EXIT_DO_NOT_REQUEUE if decision.action == "stop" else rc


def _remove_empty_temp_files(cfg: MonitorConfig, job_id: str | None) -> list[str]:
    """After a storage fault, once srun returned (no rank writes any more): delete the zero-byte
    temp files the failed writes left in the job's log folders (submitit's
    ``*_result.pkl.save_tmp``, ``.*.tmp``); they hold nothing and only confuse."""
    removed = []
    folders = {Path(g.replace("{job_id}", str(job_id))).parent for g in cfg.log_globs if job_id or
               "{job_id}" not in g}
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for p in entries:
            try:
                if p.name.endswith((".save_tmp", ".tmp")) and p.is_file() and p.stat().st_size == 0:
                    p.unlink()
                    removed.append(str(p))
            except OSError:
                continue
    return removed


def _clean_after_storage_fault(cfg: MonitorConfig, job_id: str | None) -> None:
    removed = _remove_empty_temp_files(cfg, job_id)
    if removed:
        log(f"removed {len(removed)} zero-byte temp file(s) of writes the full disk cut off",
            files=removed[:10])


def _decide_safely(rc: int, monitor_dir, world_size: int, cfg: MonitorConfig, **kw) -> int:
    """`decide_on_exit`, and if it still fails (a bug, or an error nobody foresaw), one log line
    and srun's status: the batch script must end with a status, never a traceback."""
    try:
        return decide_on_exit(rc, monitor_dir, world_size, cfg, **kw)
    except Exception as e:  # noqa: BLE001 - the EXIT trap's last line of defence
        log(f"on_exit could not decide ({type(e).__name__}: {e}); exiting with srun's status {rc}")
        return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.on_exit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rc", type=int, required=True, help="srun's exit status")
    ap.add_argument("--monitor-dir", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--job-id", default=None)
    ap.add_argument("--attempt", type=int, default=None)
    ap.add_argument("--sidecar-pid", type=int, default=None)
    ap.add_argument("--config-json", default=None)
    ap.add_argument("--may-restart", action="store_true",
                    help=f"called by the step loop: exit {injob.EXIT_RESTART} to start the next step")
    args = ap.parse_args(argv)
    cfg, job_id, attempt = job_settings(args)
    return _decide_safely(args.rc, args.monitor_dir, args.world_size, cfg, job_id=job_id,
                          attempt=attempt, sidecar_pid=args.sidecar_pid,
                          may_restart=args.may_restart)


if __name__ == "__main__":
    sys.exit(main())
