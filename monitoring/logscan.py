"""Find the verdicts NCCL, gloo and srun already wrote in the rank logs.

PyTorch's NCCL watchdog, gloo and srun say a lot about a failure before the monitor does:

    [rank3]:[E ...] [PG ID 0 PG GUID 0(default_pg) Rank 3] Watchdog caught collective operation
        timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, NumelIn=1, ...) ran for 600012 milliseconds
    ProcessGroupNCCL's watchdog got stuck for 480 seconds without making progress ...
    RuntimeError: [.../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms ...
    [.../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:23456
    srun: error: n2: task 3: Exited with exit code 3

`scan_logs(globs)` returns them as `LogFinding`s with the rank taken from the line ("Rank 3",
"[rank3]") or from submitit's file name (``<job>_<task>_log.err``). Only the last
``tail_bytes`` of each file are read: a 10-GB log must not stall the diagnosis.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LogFinding", "scan_logs", "scan_text", "PATTERNS"]

PATTERNS: list[tuple[str, re.Pattern]] = [
    ("nccl_watchdog_timeout", re.compile(
        r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(?P<seq>\d+), "
        r"OpType=(?P<op>\w+).*?\) ran for (?P<ms>\d+) milliseconds")),
    ("nccl_watchdog_stuck", re.compile(r"ProcessGroupNCCL's watchdog got stuck")),
    ("nccl_error", re.compile(r"(NCCL error|ncclInternalError|ncclSystemError|ncclRemoteError)"
                              r"[^\n]{0,200}")),
    ("gloo_timeout", re.compile(r"gloo[^\n]*Timed out waiting (?P<ms>\d+)ms for "
                                r"(?P<op>\w+) operation")),
    ("gloo_peer_closed", re.compile(r"gloo[^\n]*(Connection closed by peer|Connection reset by "
                                    r"peer)")),
    ("srun_task_exit", re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): "
                                  r"(?P<what>Exited with exit code \d+|Killed|Terminated|"
                                  r"Segmentation fault|Aborted)")),
    ("step_cancelled", re.compile(r"\*\*\* (STEP|JOB) [\d.]+ ON (?P<node>\S+) CANCELLED AT "
                                  r"(?P<at>\S+)(?P<why>[^*]*)\*\*\*")),
    # written by the monitor's setup lines into the batch log when an attempt starts
    ("attempt_start", re.compile(r"tulu-hpc monitor: attempt (?P<attempt>\d+) of job \S+ starts")),
    # a full / over-quota / read-only / failing file system (monitoring.storage)
    ("storage_error", re.compile(r"\[Errno (28|122|30|5)\]|No space left on device|Disk quota "
                                 r"exceeded|Read-only file system")),
]

_RANK_IN_LINE = re.compile(r"(?:\[rank(\d+)\]|\bRank (\d+)\])")
_RANK_IN_NAME = re.compile(r"_(\d+)_log\.(?:err|out)$")   # submitit: <job>_<task>_log.err


@dataclass(frozen=True, slots=True)
class LogFinding:
    kind: str
    file: str
    line_no: int
    rank: int | None
    line: str
    fields: dict

    def to_dict(self) -> dict:
        return {"kind": self.kind, "file": self.file, "line_no": self.line_no,
                "rank": self.rank, "line": self.line[:500], "fields": self.fields}


def scan_text(text: str, file: str = "", first_line_no: int = 1) -> list[LogFinding]:
    name_rank = _RANK_IN_NAME.search(file)
    findings = []
    for i, line in enumerate(text.splitlines()):
        for kind, pat in PATTERNS:
            m = pat.search(line)
            if not m:
                continue
            lr = _RANK_IN_LINE.search(line)
            rank = int(lr.group(1) or lr.group(2)) if lr else (
                int(name_rank.group(1)) if name_rank and kind != "srun_task_exit" else None)
            fields = {k: v for k, v in m.groupdict().items() if v is not None}
            findings.append(LogFinding(kind, file, first_line_no + i, rank, line.strip(), fields))
            break
    return findings


def scan_logs(globs: list[str], tail_bytes: int = 2_000_000,
              max_findings: int = 200) -> list[LogFinding]:
    findings: list[LogFinding] = []
    for pattern in globs:
        for path in sorted(glob.glob(pattern)):
            p = Path(path)
            try:
                size = p.stat().st_size
                with open(p, "rb") as f:
                    if size > tail_bytes:
                        f.seek(size - tail_bytes)
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            findings += scan_text(text, str(p), first_line_no=1 if size <= tail_bytes else 0)
            if len(findings) >= max_findings:
                return findings[:max_findings]
    return findings


def srun_failed_tasks(findings: list[LogFinding]) -> list[tuple[int, str, str]]:
    """(task, node, what) from srun's own messages of the current attempt, in srun's order:
    srun reports tasks as they end, so the first is the culprit, and a rank that was SIGKILLed
    (OOM killer, injected) is reported as "Killed" before its peers' "Exited with exit code 1"
    (their communication errors). The batch log is appended across requeues: lines before
    the last "*** JOB ... CANCELLED ... DUE TO JOB REQUEUE ***", or before the monitor's own
    "attempt N ... starts" line (slurmstepd writes the former only when it still finds the batch
    script running), belong to earlier attempts."""
    out: list[tuple[int, str, str]] = []
    for f in findings:
        if (f.kind == "step_cancelled" and "REQUEUE" in f.fields.get("why", "")) or \
                f.kind == "attempt_start":
            out = []
            continue
        if f.kind != "srun_task_exit":
            continue
        for part in f.fields["tasks"].split(","):
            lo, _, hi = part.partition("-")
            for t in range(int(lo), int(hi or lo) + 1):
                out.append((t, f.fields["node"], f.fields["what"]))
    return out
