"""From a `Fault` to a `HangReport`: who is to blame, where, and what everyone was doing.

`name_culprits` is a pure function (records, stacks, log findings in; culprits out). Its
rules, first match wins:

- **crash**: a rank that failed with its own error (not a communication error caused by a
  peer), earliest first; else a rank that vanished without recording an exit (SIGKILL, OOM
  killer, segfault); else srun's first non-"Killed" task; else the earliest communication
  failure.
- **hang / stall**: ranks that are dead, exited or stopped (SIGSTOP) while the others wait;
  else the ranks *not* in the phase the hung ranks wait in, or in it at an earlier step (they
  never reached the collective); else, from the stacks, the minority whose main thread is
  somewhere other than where the majority waits; else no culprit (all ranks wait in the same
  place: suspect the network or the collective itself, see the NCCL findings).
- **startup**: the ranks that never reported.
- **storage**: a crash whose cause is a full, over-quota, read-only or failing file system
  (ENOSPC, EDQUOT, EROFS, EIO: from a failed rank's recorded detail or error, or a log line).
  The ranks that hit it are named, but no node is blamed: excluding a node does not free a
  shared file system.

`diagnose` gathers the evidence (stacks, logs, flight-recorder dumps) and builds the report;
`write_report` writes ``reports/<utc>_<kind>.json`` and ``.txt`` plus ``last_report.json`` /
``last_report.txt`` (in the fallback folder when the monitor dir cannot be written, see
`monitoring.storage`; it never raises); `load_last_report` reads it back for ``tulu status``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from monitoring.config import MonitorConfig
from monitoring.detect import Detector, Fault
from monitoring.logscan import LogFinding, scan_logs, srun_failed_tasks
from monitoring.progress import meta_path
from monitoring.record import STATE_EXITED, STATE_FAILED, RankRecord
from monitoring.stacks import RankStack, collect_stacks, innermost_frame, on_node, request_flight_recorder_dumps
from monitoring.storage import StorageFault, fault_from_text, files_for, say

__all__ = ["Culprit", "HangReport", "name_culprits", "diagnose", "write_report",
           "load_last_report", "request_flight_recorder_dumps", "storage_fault_of"]

_COMM_ERROR = re.compile(r"gloo|nccl|ProcessGroup|DistBackendError|DistNetworkError|"
                         r"Connection (closed|reset)|Broken pipe|collective", re.I)


@dataclass(frozen=True, slots=True)
class Culprit:
    rank: int
    node: str     # scheduler node name (what ExcNodeList takes); "" if unknown
    pid: int
    reason: str
    host: str = ""

    def to_dict(self) -> dict:
        return {"rank": self.rank, "node": self.node, "host": self.host or self.node,
                "pid": self.pid, "reason": self.reason}


def _c(r: RankRecord, reason: str) -> Culprit:
    return Culprit(r.rank, r.node, r.pid, reason, host=r.host)


def _where(r: RankRecord) -> str:
    if r.state == STATE_EXITED:
        return f"exited (code {r.exit_code}{', status unknown' if r.exit_code == -1 else ''})"
    if r.state == STATE_FAILED:
        return f"failed (code {r.exit_code}: {r.error or 'no message'})"
    if r.phase:
        return f"in phase {r.phase!r} at step {r.phase_step}"
    return f"between phases after step {r.done_step}"


def name_culprits(fault: Fault, records: list[RankRecord | None],
                  stacks: dict[int, RankStack] | None = None,
                  alive: dict[int, bool | None] | None = None,
                  findings: list[LogFinding] | None = None) -> list[Culprit]:
    stacks, alive, findings = stacks or {}, alive or {}, findings or []
    present = [r for r in records if r is not None]
    by_rank = {r.rank: r for r in present}

    if fault.kind == "startup":
        return [Culprit(rank, "", 0, "never reported progress (did not start, or hung before "
                        "building its ProgressTracker)") for rank in fault.ranks]

    if fault.kind == "crash":
        failed = sorted((r for r in present if r.state == STATE_FAILED),
                        key=lambda r: r.exit_time)
        own = [r for r in failed if not _COMM_ERROR.search(r.error or "")]
        if own:
            return [_c(r, f"failed with its own error (exit code {r.exit_code}): "
                       f"{r.error or 'no message'}") for r in own]
        vanished = [r for r in present if alive.get(r.rank) is False and r.state != STATE_FAILED
                    and r.state != STATE_EXITED]
        if vanished:
            return [_c(r, f"process {r.pid} vanished without recording an exit (SIGKILL, "
                       f"OOM killer or a crash in C code) while {_where(r)}") for r in vanished]
        tasks = srun_failed_tasks(findings)
        if tasks:
            t, node, what = tasks[0]
            r = by_rank.get(t)
            return [Culprit(t, node, r.pid if r else 0, f"srun: task {t} on {node}: {what}")]
        if failed:
            r = failed[0]
            return [_c(r, f"first rank to fail (a communication error; its peer may be the real "
                       f"cause): {r.error}")]
        return []

    # hang / stall
    gone = [r for r in present if alive.get(r.rank) is False
            or r.state in (STATE_EXITED, STATE_FAILED)]
    stopped = [r for r in present if r not in gone and
               stacks.get(r.rank) is not None and stacks[r.rank].proc_state.startswith(("T", "t"))]
    culprits = [_c(r, f"{'process gone' if alive.get(r.rank) is False else _where(r)} while "
                      f"the others wait") for r in gone]
    culprits += [_c(r, f"process is stopped ({stacks[r.rank].proc_state}) {_where(r)}")
                 for r in stopped]
    if culprits:
        return culprits

    live = [r for r in present if r.rank not in {c.rank for c in culprits}]
    if fault.kind == "hang" and fault.phase:
        waiting = [r for r in live if r.phase == fault.phase]
        top_step = max((r.phase_step for r in waiting), default=-1)
        lagging = [r for r in live if r.phase != fault.phase or r.phase_step < top_step]
        if lagging and len(lagging) < len(live):
            n = sum(1 for r in waiting if r.phase_step == top_step)
            return [_c(r, f"not in phase {fault.phase!r} step {top_step} where {n} rank(s) "
                          f"wait: {_where(r)}") for r in lagging]
    elif fault.kind == "stall":
        top = max((r.done_step for r in live), default=-1)
        lagging = [r for r in live if r.done_step < top]
        if lagging and len(lagging) < len(live):
            return [_c(r, f"lags at step {r.done_step} while others finished step {top}; "
                          f"{_where(r)}") for r in lagging]

    frames = {r.rank: innermost_frame(stacks[r.rank].text) for r in live
              if r.rank in stacks and stacks[r.rank].text}
    frames = {k: v for k, v in frames.items() if v}
    if len(frames) >= 3:
        (common, n), = Counter(frames.values()).most_common(1)
        odd = [by_rank[k] for k, v in frames.items() if v != common]
        if odd and n > len(frames) / 2:
            return [_c(r, f"its main thread is in {frames[r.rank]} while {n} rank(s) wait in "
                          f"{common} ({_where(r)})") for r in odd]
    return []


@dataclass(slots=True)
class HangReport:
    """What the monitor saw and concluded; written as JSON and as text."""

    kind: str
    detected_at: float
    job_id: str | None
    attempt: int
    world_size: int
    fault: dict
    culprits: list[dict]
    culprit_nodes: list[str]
    summary: str
    ranks: list[dict] = field(default_factory=list)
    stacks: dict[str, dict] = field(default_factory=dict)
    log_findings: list[dict] = field(default_factory=list)
    timeouts: dict = field(default_factory=dict)
    flight_recorder: dict = field(default_factory=dict)
    reporter: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    storage: dict = field(default_factory=dict)   # kind "storage": the StorageFault; always:
    #                                               the monitor's own failed writes
    agents: dict = field(default_factory=dict)    # node -> did its monitor agent answer

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    def to_text(self) -> str:
        when = _utc(self.detected_at, pretty=True)
        lines = [f"tulu-hpc health monitor: {self.kind.upper()} detected at {when}",
                 f"job {self.job_id or '-'} attempt {self.attempt}, {self.world_size} ranks",
                 "", self.summary, "", f"rule: {self.fault.get('detail', '')}", ""]
        if self.storage.get("fault"):
            f = StorageFault.from_dict(self.storage["fault"])
            if f is not None:
                lines += [f"storage: {f.line()}", f"what to do: {self.storage.get('advice', '')}", ""]
        for w in self.storage.get("monitor_write_failures", [])[:5]:
            lines.append(f"monitor could not write {w.get('path')}: {w.get('name')} "
                         f"{w.get('error', '')}".rstrip())
        if self.culprits:
            lines.append("culprit(s):")
            lines += [f"  rank {c['rank']} on {c['node'] or '?'} (pid {c['pid']}): {c['reason']}"
                      for c in self.culprits]
        else:
            lines.append("culprit: not identified (every rank waits in the same place)")
        lines += ["", "ranks:"]
        for r in self.ranks:
            lines.append(f"  {r['rank']:>4} {r['node']:<16} pid {r['pid']:<8} {r['state']:<8} "
                         f"{r['phase']} step {r['phase_step']} (last done {r['done_step']})")
        if self.log_findings:
            lines += ["", "log findings:"]
            lines += [f"  [{f['kind']}] rank {f['rank']} {Path(f['file']).name}:{f['line_no']}: "
                      f"{f['line'][:200]}" for f in self.log_findings[:30]]
        if self.agents:
            lines += ["", "node agents:"]
            lines += [f"  {n}: " + (f"answered in {a.get('seconds')} s (ranks {a.get('ranks')})"
                                    if a.get("answered") else f"NO ANSWER: {a.get('note', '')}")
                      for n, a in sorted(self.agents.items())]
        if self.stacks:
            lines += ["", "stacks:"]
            for rank, s in sorted(self.stacks.items(), key=lambda kv: int(kv[0])):
                on = f" on {s['node']}" if s.get("node") else ""
                lines.append(f"--- rank {rank}{on} ({s['method']}) {s['proc_state']} {s['note']}")
                lines += ["    " + t for t in s["text"].rstrip().splitlines()[:60]]
        return "\n".join(lines) + "\n"


def _utc(t: float, pretty: bool = False) -> str:
    d = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    return d.strftime("%Y-%m-%d %H:%M:%S UTC" if pretty else "%Y%m%dT%H%M%S") + (
        "" if pretty else f"{int(t * 1000) % 1000:03d}Z")


def storage_fault_of(records: list[RankRecord | None],
                     findings: list[LogFinding] | None = None) -> tuple[StorageFault, list[int]] | None:
    """The storage fault behind a crash and the ranks that hit it, or None. A failed rank's
    recorded detail (JSON from its excepthook: path and bytes) wins over its error text, which
    wins over a log line."""
    failed = sorted((r for r in records if r is not None and r.state == STATE_FAILED),
                    key=lambda r: r.exit_time)
    best: StorageFault | None = None
    ranks: list[int] = []
    for r in failed:
        f = fault_from_text(r.detail) or fault_from_text(r.error)
        if f is None:
            continue
        ranks.append(r.rank)
        if best is None or (not best.path and f.path) or (best.needed_bytes is None
                                                           and f.needed_bytes is not None):
            best = f
    for lf in findings or []:
        if best is not None and best.path:
            break
        f = fault_from_text(lf.line) if lf.kind == "storage_error" else None
        if f is not None and (best is None or (f.path and not best.path)):
            best = f
            if lf.rank is not None and lf.rank not in ranks:
                ranks.append(lf.rank)
    return (best.with_space(), ranks) if best is not None else None


def diagnose(fault: Fault, records: list[RankRecord | None], *, monitor_dir: str | os.PathLike,
             cfg: MonitorConfig, detector: Detector | None = None,
             alive: dict[int, bool | None] | None = None, job_id: str | None = None,
             attempt: int = 0, collect: bool = True, host: str | None = None,
             node: str | None = None) -> HangReport:
    """Collect the evidence for ``fault`` and build its report (does not write it). With
    ``node`` (the sidecar's Slurm node: node agents run), the stacks of ranks on other nodes
    come from their nodes' agents (`monitoring.agent`); an agent that does not answer within
    ``cfg.agent_wait_s`` is named in ``agents`` and in those ranks' stack notes."""
    host = host or socket.gethostname()
    present = [r for r in records if r is not None]
    alive = alive or {}
    stacks: dict[int, RankStack] = {}
    fr: dict = {}
    live = [r for r in present if r.state not in (STATE_EXITED, STATE_FAILED)
            and alive.get(r.rank) is not False]
    agents: dict = {}
    if collect and fault.kind != "crash" and live:
        from monitoring import agent

        remote = [r for r in live if node and not on_node(r, host, node)]
        asked = (agent.request_stacks(monitor_dir, remote, wait_s=cfg.stack_wait_s,
                                      use_py_spy=cfg.use_py_spy) if remote else None)
        # A rank's flight-recorder pipe is a FIFO: only a writer on its node reaches it, so the
        # other nodes' ranks are asked by their agents (with their stacks)
        remote_ranks = {r.rank for r in remote}
        fr = request_flight_recorder_dumps(monitor_dir, [r for r in live if r.rank not in remote_ranks])
        stacks = collect_stacks(monitor_dir, live, host, wait_s=cfg.stack_wait_s,
                                use_py_spy=cfg.use_py_spy, node=node)
        if asked is not None:
            theirs, agents = agent.gather_stacks(monitor_dir, asked, cfg.agent_wait_s)
            stacks.update(theirs)
            for a in agents.values():
                for k, v in a.get("flight_recorder", {}).items():
                    fr[k] = sorted(fr.get(k, []) + v)
    # "{job_id}" in a glob narrows the scan to this job's logs: a run folder collects the logs
    # of every job submitted into it, and another job's srun lines must not name the culprit.
    globs = [g.replace("{job_id}", str(job_id)) if job_id else g for g in cfg.log_globs]
    findings = scan_logs(globs) if globs else []
    culprits = name_culprits(fault, records, stacks, alive, findings)
    nodes = sorted({c.node for c in culprits if c.node})
    kind = fault.kind
    storage: dict = {}
    found = storage_fault_of(records, findings) if fault.kind == "crash" else None
    if found is not None:
        sf, hit = found
        kind = "storage"
        by_rank = {r.rank: r for r in present}
        culprits = [Culprit(r, by_rank[r].node if r in by_rank else "", by_rank[r].pid if r in by_rank else 0,
                            f"storage fault: {sf.line()}", host=by_rank[r].host if r in by_rank else "")
                    for r in hit]
        nodes = []   # a shared file system is not a node's fault: exclude none
        storage = {"fault": sf.to_dict(), "line": sf.line(), "advice": sf.advice}
    own_failures = files_for(monitor_dir).failures
    if own_failures:
        storage["monitor_write_failures"] = list(own_failures)
    if kind == "storage":
        who = ", ".join(f"rank {c.rank}" for c in culprits[:8]) or "a rank"
        summary = (f"storage: {storage['line']} (hit by {who}); not a node fault, nothing excluded. "
                   f"{storage['advice'][:1].upper()}{storage['advice'][1:]}, then resubmit: the run "
                   f"resumes from its last committed checkpoint")
    elif culprits:
        who = ", ".join(f"rank {c.rank} on {c.node or '?'}" for c in culprits[:8])
        summary = f"{fault.kind}: culprit {who}" + (" ..." if len(culprits) > 8 else "")
        summary += f" - {culprits[0].reason}"
    else:
        summary = (f"{fault.kind}: no culprit rank identified; {fault.detail}. All ranks wait in "
                   f"the same place: suspect the network/collective (see the NCCL findings).")
    silent = sorted(n for n, a in agents.items() if not a.get("answered"))
    if silent:
        summary += (f" The monitor agent(s) on {', '.join(silent)} did not answer within "
                    f"{cfg.agent_wait_s:.0f} s: those ranks' stacks and states are unknown.")
    timeouts = {}
    if detector is not None:
        timeouts = {"learned": detector.learned_timeouts(),
                    "configured": dict(cfg.phase_timeouts_s),
                    "default_timeout_s": cfg.default_timeout_s,
                    "stall_timeout_s": cfg.stall_timeout_s}
    return HangReport(
        kind=kind, detected_at=time.time(), job_id=job_id, attempt=attempt,
        world_size=len(records), fault=fault.to_dict(),
        culprits=[c.to_dict() for c in culprits], culprit_nodes=nodes, summary=summary,
        ranks=[r.to_dict() for r in present], stacks={str(k): v.to_dict() for k, v in
                                                      stacks.items()},
        log_findings=[f.to_dict() for f in findings], timeouts=timeouts, flight_recorder=fr,
        reporter={"host": host, "node": node or "", "pid": os.getpid()}, storage=storage,
        agents=agents)


def write_report(monitor_dir: str | os.PathLike, report: HangReport) -> Path | None:
    """Write the report; returns the path its JSON landed at (the monitor dir, else the fallback
    folder), or None when neither could be written: then its text goes to stdout/stderr. Never
    raises. ``last_report.json`` is a copy (not a symlink: copies survive rsync and object
    stores)."""
    io = files_for(monitor_dir)
    d = Path(monitor_dir) / "reports"
    stem = f"{_utc(report.detected_at)}_{report.kind}"
    jpath, tpath = d / f"{stem}.json", d / f"{stem}.txt"
    text = report.to_text()
    where = io.write_text(tpath, text, what="monitor report")   # the text first: where it
    report.files = {"json": str(jpath), "text": str(tpath)}     # lands, the JSON will too
    if where is not None and where != tpath:
        report.files = {"json": str(where.with_suffix(".json")), "text": str(where),
                        "monitor_dir_unwritable": str(jpath)}
    if io.failures:
        report.storage.setdefault("monitor_write_failures", list(io.failures))
    data = json.dumps(report.to_dict(), indent=1, sort_keys=True)
    landed = io.write_text(jpath, data, what="monitor report")
    io.write_text(Path(monitor_dir) / "last_report.json", data, what="monitor report")
    io.write_text(Path(monitor_dir) / "last_report.txt", text, what="monitor report")
    if landed is None:
        say("tulu-hpc health monitor: the report could not be written anywhere; here it is:\n" + text)
    return landed


def load_last_report(monitor_dir: str | os.PathLike, *, fallback_dir: str | None = None,
                     job_id: str | None = None) -> dict | None:
    """The newest report as a dict (keys as in `HangReport`), from the monitor dir or its
    fallback folder (``MonitorConfig.fallback_dir`` and the job id name it), or None."""
    io = files_for(monitor_dir, fallback_dir=fallback_dir, job_id=job_id)
    text = io.read_text(Path(monitor_dir) / "last_report.json")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
