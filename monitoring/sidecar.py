"""The monitor sidecar: a separate process that watches every rank's progress record.

    python -m monitoring.sidecar --monitor-dir D --world-size N [--job-id J] [--attempt A]
                                 [--config-json '{"check_interval_s": 5, ...}']

Every ``check_interval_s`` it reads the records (plain ``pread``s: a stopped, deadlocked or
dead rank cannot block it), checks which pids on its node are still alive (those on other
nodes: from their node agents' heartbeats, `monitoring.agent`), and runs the `Detector`. On the first fault it diagnoses (stacks, logs, culprits), writes the report, and
hands the decision to `monitoring.recovery.handle_fault` (restart in the job on a spare node /
requeue / stop). Then it exits: after a requeue Slurm ends the job anyway, after an in-job
restart the step loop starts a new sidecar for the next attempt, and one report per attempt
is enough.

Exit status: 0 when every rank exited cleanly, `EXIT_FAULT` (3) after a fault was handled,
`EXIT_REQUEUE_FAILED` (4) when its requeue failed every try (the EXIT trap tries again), 2 on
bad arguments. Before it requeues, it SIGKILLs the attempt's ranks (local pids, then the job's
srun steps): no rank of a dead attempt, SIGSTOPped or not, steps on after the decision.

An I/O error never ends it: what cannot be written to the monitor dir goes to the fallback
folder (`monitoring.storage`), log lines that stdout refuses go there too. While it diagnoses
it keeps ``sidecar_busy.json`` in the monitor dir so the EXIT trap's on_exit waits for its
verdict instead of racing it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from monitoring.config import MonitorConfig
from monitoring.detect import Detector, Fault
from monitoring.agent import agent_liveness, rank_alive
from monitoring.diagnosis import diagnose, write_report
from monitoring.record import STATE_RUNNING, RankRecord, monitor_session, monitor_start, read_all
from monitoring.recovery import AGENTS_STEP, handle_fault, settle_pending_requeues
from monitoring.stacks import on_node
from monitoring import slurm, storage

__all__ = ["Sidecar", "pid_alive", "main", "EXIT_FAULT", "EXIT_REQUEUE_FAILED"]

EXIT_FAULT = 3
EXIT_REQUEUE_FAILED = 4    # a requeue was decided, every scontrol try failed (EXIT trap retries)
BUSY = "sidecar_busy.json"
LEARNED = "learned_timeouts.json"


def _no_logs(cfg: MonitorConfig) -> MonitorConfig:
    return MonitorConfig.from_dict({**cfg.to_dict(), "log_globs": []})


def pid_alive(r: RankRecord, host: str, node: str | None = None) -> bool | None:
    """False if rank r's process is known gone (or a zombie, or the pid was reused), None if
    it runs on another host or node (cannot tell from here), True otherwise."""
    if not on_node(r, host, node):
        return None
    return rank_alive(r)


def log(msg: str, **fields) -> None:
    """One line to the monitor log (stdout); to ``monitor.log`` in the fallback folder when
    stdout's file system refuses it. Never raises."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    extra = (" " + json.dumps(fields, sort_keys=True, default=str)) if fields else ""
    line = f"[monitor {stamp}Z] {msg}{extra}"
    try:
        print(line, flush=True)
        return
    except (OSError, ValueError):
        pass
    fb = storage.files.fallback or storage.default_fallback_dir(os.environ.get("SLURM_JOB_ID"))
    if storage.files.append_line(fb / "monitor.log", line + "\n") is None:
        storage.say(line)


class Sidecar:
    def __init__(self, monitor_dir: str | os.PathLike, world_size: int, cfg: MonitorConfig,
                 *, job_id: str | None = None, attempt: int = 0, host: str | None = None,
                 node: str | None = None, clock=time.time) -> None:
        self.dir = Path(monitor_dir)
        self.world_size, self.cfg, self.job_id, self.attempt = world_size, cfg, job_id, attempt
        self.host = host or socket.gethostname()
        # The Slurm node it runs on (the batch script passes it; node agents run there): ranks
        # of other nodes are the agents' to see. None: every rank on this host is local.
        self.node = node or None
        self.clock = clock
        self.since = monitor_start()   # records older than this job's start are not its own
        self.session = monitor_session()   # nor are records another session stamped
        self.detector = Detector(cfg, world_size, attempt, start_time=clock())
        self.detector.observed.update(self._load_learned())
        self._saved_learned: dict = dict(self.detector.observed)
        self._warned_learned = False
        for entry in settle_pending_requeues(self.dir, job_id, attempt):
            log("recorded a requeue whose maker was killed before it could", entry=entry)

    def _load_learned(self) -> dict[str, tuple[float, int]]:
        """Durations observed by earlier attempts (a restart should not forget that a
        checkpoint takes 4 minutes)."""
        try:
            data = json.loads(storage.files_for(self.dir).read_text(self.dir / LEARNED) or "{}")
            return {k: (float(v[0]), int(v[1])) for k, v in data.get("observed", {}).items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return {}

    def _save_learned(self) -> None:
        if self.detector.observed == self._saved_learned:
            return
        data = {"observed": self.detector.observed,
                "timeouts": self.detector.learned_timeouts()}
        where = storage.files_for(self.dir).write_text(self.dir / LEARNED,
                                                       json.dumps(data, sort_keys=True),
                                                       what="learned time-outs")
        if where is not None:
            self._saved_learned = dict(self.detector.observed)
        if where != self.dir / LEARNED and not self._warned_learned:
            self._warned_learned = True   # kept in memory; retried at the next change
            log(f"cannot write {self.dir / LEARNED}"
                + (f"; written to {where}" if where else "; kept in memory"),
                failure=(storage.files_for(self.dir).failures or [{}])[-1])

    def snapshot(self) -> tuple[list[RankRecord | None], dict[int, bool | None]]:
        records = read_all(self.dir, self.world_size, since=self.since, session=self.session)
        running = [r for r in records
                   if r is not None and r.attempt == self.attempt and r.state == STATE_RUNNING]
        alive = {r.rank: pid_alive(r, self.host, self.node) for r in running}
        remote = [r for r in running if alive[r.rank] is None and self.node]
        if remote:   # a heartbeat older than 3 rounds (and 10 s) says nothing any more
            alive.update(agent_liveness(self.dir, remote,
                                        max(3 * self.cfg.check_interval_s, 10.0)))
        return records, alive

    def check_once(self) -> list[Fault]:
        records, alive = self.snapshot()
        return self.detector.check(records, self.clock(), alive)

    def handle(self, fault: Fault) -> dict:
        busy = self.dir / BUSY
        io = storage.files_for(self.dir)
        io.write_text(busy, json.dumps({"pid": os.getpid(), "fault": fault.to_dict()}),
                      what="sidecar busy marker")
        try:
            log(f"detected {fault.kind}: {fault.detail}")
            records, alive = self.snapshot()
            records = [r if r is not None and r.attempt == self.attempt else None
                       for r in records]
            kw = dict(monitor_dir=self.dir, cfg=self.cfg, detector=self.detector, alive=alive,
                      job_id=self.job_id, attempt=self.attempt, host=self.host, node=self.node)
            try:
                report = diagnose(fault, records, **kw)
            except OSError as e:   # stacks or logs unreadable/unwritable: decide without them
                log(f"diagnosis without stacks and logs: {e}")
                report = diagnose(fault, records, collect=False, **{**kw, "cfg": _no_logs(self.cfg)})
            path = write_report(self.dir, report)
            log(f"report {path or '(written nowhere: text on stdout/stderr)'}: {report.summary}")
            step = max((r.done_step for r in records if r is not None), default=-1)
            decision = handle_fault(
                self.dir, job_id=self.job_id, attempt=self.attempt, fault_kind=report.kind,
                step=step, cfg=self.cfg, culprit_nodes=report.culprit_nodes,
                culprit_ranks=[c["rank"] for c in report.culprits], by="sidecar",
                report=str(path) if path else None, job_running=True,
                storage_line=report.storage.get("line", ""),
                stop_ranks=lambda: self._stop_attempt(records),
                may_restart=True, stop_step=lambda: self._stop_step(records))
            log(f"decision: {decision.action}: {decision.reason}",
                exclude=list(decision.exclude_nodes))
            if self.cfg.kill_ranks_on_fault and not self.job_id:
                self._kill_local_ranks(records)
            return {"report": str(path), "decision": decision.action}
        finally:
            io.unlink(busy)

    def _kill_local_ranks(self, records: list[RankRecord | None],
                          wait_s: float = 5.0) -> list[str]:
        """SIGKILL this host's ranks and wait (up to ``wait_s``) until they are gone: a signal
        is delivered asynchronously, and a rank must not step between this and the requeue."""
        killed = []
        for r in records:
            if r is not None and pid_alive(r, self.host, self.node):
                try:
                    os.kill(r.pid, signal.SIGKILL)
                    killed.append(r)
                except OSError:
                    pass
        deadline = time.monotonic() + wait_s
        while any(pid_alive(r, self.host, self.node) for r in killed) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [f"rank {r.rank} pid {r.pid}" for r in killed]

    def _stop_attempt(self, records: list[RankRecord | None]) -> list[str]:
        """Before a requeue: SIGKILL this attempt's ranks, so that none runs a step after the
        decision (the requeue's SIGTERM comes with a SIGCONT: a SIGSTOPped rank would run on
        until KillWait). Local pids first (at once, even when Slurm is slow), then every task
        of the job's srun steps on every node (``scancel --signal=KILL J.S``)."""
        killed = self._kill_local_ranks(records)
        if self.job_id:
            try:
                killed += [f"step {s}" for s in slurm.kill_steps(self.job_id)]
            except slurm.SlurmCommandError as e:
                log(f"cannot SIGKILL the job's steps (the requeue still ends them): {e}")
        log("SIGKILLed the attempt's ranks before the requeue", killed=killed)
        return killed

    def _stop_step(self, records: list[RankRecord | None]) -> list[str]:
        """Before an in-job restart: SIGKILL this attempt's ranks (local pids, then the job's
        training step on every node), sparing the monitor agents' step: the next step needs
        them. A hung step never ends by itself; the step loop waits for it. No wait for the
        local pids to vanish (a requeue's does): the next step starts only once srun returned,
        and srun returns only once every task of the step is gone."""
        killed = self._kill_local_ranks(records, wait_s=0.0)
        steps: list[str] = []
        for attempt in range(3):   # slurmctld may be briefly unreachable: the loop waits on it
            if not self.job_id:
                break
            try:
                steps = slurm.kill_steps(self.job_id, skip_names=(AGENTS_STEP,))
                break
            except slurm.SlurmCommandError as e:
                log(f"cannot SIGKILL the job's training step (try {attempt + 1} of 3): {e}")
                time.sleep(2.0)
        killed += [f"step {s}" for s in steps]
        log("SIGKILLed the attempt's ranks before the in-job restart", killed=killed)
        return killed

    def run(self, max_seconds: float | None = None) -> int:
        log("watching", monitor_dir=str(self.dir), world_size=self.world_size,
            job_id=self.job_id, attempt=self.attempt, host=self.host, node=self.node,
            pid=os.getpid())
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while deadline is None or time.monotonic() < deadline:
            try:
                faults = self.check_once()
            except OSError as e:   # a record unreadable (EIO): look again next round
                log(f"cannot read the progress records: {e}")
                time.sleep(self.cfg.check_interval_s)
                continue
            self._save_learned()
            if faults:
                done = self.handle(faults[0])
                return EXIT_REQUEUE_FAILED if done["decision"] == "requeue_failed" else EXIT_FAULT
            if self.detector.finished:
                log("every rank exited cleanly")
                return 0
            time.sleep(self.cfg.check_interval_s)
        log("max_seconds reached")
        return 0


def job_settings(args: argparse.Namespace) -> tuple[MonitorConfig, str | None, int]:
    """The monitor config, job id and attempt a monitor process (sidecar or exit hook) runs
    with: the command line's, else Slurm's environment; also points storage at its folders."""
    cfg = MonitorConfig.from_json(args.config_json)
    job_id = args.job_id or os.environ.get("SLURM_JOB_ID") or None
    attempt = args.attempt if args.attempt is not None else int(
        os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    storage.configure(args.monitor_dir, cfg.fallback_dir, job_id)
    return cfg, job_id, attempt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.sidecar", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--monitor-dir", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--job-id", default=None, help="Slurm job id (default: $SLURM_JOB_ID); "
                    "without one the sidecar only reports")
    ap.add_argument("--attempt", type=int, default=None,
                    help="restart count (default: $SLURM_RESTART_COUNT or 0)")
    ap.add_argument("--config-json", default=None, help="MonitorConfig fields as JSON")
    ap.add_argument("--node", default=None, help="the Slurm node it runs on, when node agents "
                    "run on every node of the job (the batch script passes $SLURMD_NODENAME)")
    ap.add_argument("--max-seconds", type=float, default=None)
    args = ap.parse_args(argv)
    cfg, job_id, attempt = job_settings(args)
    try:
        Path(args.monitor_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log(f"cannot create the monitor dir: {e}")
    sidecar = Sidecar(args.monitor_dir, args.world_size, cfg, job_id=job_id, attempt=attempt,
                      node=args.node)
    return sidecar.run(args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
