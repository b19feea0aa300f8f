"""The on-disk progress record: one fixed-size binary file per rank, shared by writer and reader.

``<monitor_dir>/progress/rank_00007.bin`` holds rank 7's record (2 KiB). The rank maps it and
updates fields in place (`monitoring.progress`); the sidecar reads it with ``pread`` (never a
lock, never a collective), so a SIGSTOPped, deadlocked or dead rank cannot block the reader.

Torn writes are detected with a sequence counter (a seqlock): the writer makes ``seq`` odd,
writes the fields, then makes it even again. The reader reads ``seq``, the record, ``seq``
again, and accepts the record only if both are the same even number and the record's own copy
agrees; otherwise it retries. One file per rank means no rank ever resizes a file another rank
has mapped.

Multi-node: the records must be visible across nodes, so the monitor dir has to be on a
filesystem with coherent writes across clients (Lustre, GPFS/Spectrum Scale, WekaFS). On NFS a
rank's updates reach other hosts only on write-back (seconds to ~30 s); raise the time-outs or
run one sidecar per node there.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RECORD_SIZE", "STATE_RUNNING", "STATE_EXITED", "STATE_FAILED", "RankRecord",
    "RecordLayout", "monitor_session", "monitor_start", "read_record", "read_all", "record_path",
    "session_stamp",
]

MAGIC = b"TPR1"
RECORD_SIZE = 2048
N_PHASE_SLOTS = 16
NAME_LEN = 32

STATE_RUNNING = 1
STATE_EXITED = 2   # clean exit (exit code 0)
STATE_FAILED = 3   # non-zero exit or uncaught exception

STATE_NAMES = {0: "unknown", STATE_RUNNING: "running", STATE_EXITED: "exited",
               STATE_FAILED: "failed"}


class RecordLayout:
    """Offsets and `struct.Struct` objects of the record; writer and reader share them."""

    SEQ = struct.Struct("<Q")
    IDENT = struct.Struct("<4siiiid64s64s16s")  # magic rank world pid attempt proc_start host
    #                                              node role
    PHASE = struct.Struct("<32sqdd")          # phase phase_step phase_start updated
    DONE = struct.Struct("<qddqd")            # done_step done_time max_step_gap n_steps updated
    EXIT = struct.Struct("<iid160s")          # state exit_code exit_time error
    SLOT = struct.Struct("<32sdq")            # phase name, longest duration, count
    DETAIL = struct.Struct("<640s")           # JSON: a storage fault's path, errno, bytes
    SESSION = struct.Struct("<64s")           # the monitor session ($TULU_MONITOR_SESSION)

    OFF_SEQ = 0
    OFF_IDENT = OFF_SEQ + SEQ.size
    OFF_PHASE = OFF_IDENT + IDENT.size
    OFF_DONE = OFF_PHASE + PHASE.size
    OFF_EXIT = OFF_DONE + DONE.size
    OFF_SLOTS = OFF_EXIT + EXIT.size
    OFF_DETAIL = OFF_SLOTS + N_PHASE_SLOTS * SLOT.size
    OFF_SESSION = OFF_DETAIL + DETAIL.size
    END = OFF_SESSION + SESSION.size


assert RecordLayout.END <= RECORD_SIZE, RecordLayout.END


def record_path(monitor_dir: str | os.PathLike, rank: int) -> Path:
    return Path(monitor_dir) / "progress" / f"rank_{rank:05d}.bin"


def _s(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class RankRecord:
    """One consistent snapshot of a rank's record (what the sidecar reasons about)."""

    rank: int
    world_size: int
    pid: int
    attempt: int
    proc_start: float
    host: str             # hostname (pid checks are only meaningful on the same host)
    node: str             # the scheduler's node name (what ExcNodeList takes)
    role: str
    phase: str            # "" = between phases
    phase_step: int
    phase_start: float    # wall time the current phase (or the idle gap) began
    updated: float
    done_step: int        # last step passed to step_done(), -1 before the first
    done_time: float
    max_step_gap: float   # longest observed time between two step_done() calls
    n_steps: int
    state: int
    exit_code: int
    exit_time: float
    error: str
    phase_stats: dict[str, tuple[float, int]] = field(default_factory=dict)  # name: (max s, n)
    detail: str = ""      # JSON written with a failure: a storage fault's path, errno, bytes
    session: str = ""     # the batch script's monitor session ("" from a writer without one)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))

    def to_dict(self) -> dict:
        return {
            "rank": self.rank, "host": self.host, "node": self.node, "pid": self.pid, "role": self.role,
            "attempt": self.attempt, "state": self.state_name, "exit_code": self.exit_code,
            "error": self.error, "phase": self.phase or "(between phases)",
            "phase_step": self.phase_step, "phase_start": self.phase_start,
            "done_step": self.done_step, "done_time": self.done_time, "updated": self.updated,
            **({"detail": self.detail} if self.detail else {}),
        }


def decode(buf: bytes) -> RankRecord | None:
    L = RecordLayout
    magic, rank, world, pid, attempt, proc_start, host, node, role = L.IDENT.unpack_from(
        buf, L.OFF_IDENT)
    if magic != MAGIC:
        return None
    phase, phase_step, phase_start, updated = L.PHASE.unpack_from(buf, L.OFF_PHASE)
    done_step, done_time, max_gap, n_steps, done_updated = L.DONE.unpack_from(buf, L.OFF_DONE)
    state, exit_code, exit_time, error = L.EXIT.unpack_from(buf, L.OFF_EXIT)
    (detail,) = L.DETAIL.unpack_from(buf, L.OFF_DETAIL)
    (session,) = L.SESSION.unpack_from(buf, L.OFF_SESSION)
    stats: dict[str, tuple[float, int]] = {}
    for i in range(N_PHASE_SLOTS):
        name, longest, count = L.SLOT.unpack_from(buf, L.OFF_SLOTS + i * L.SLOT.size)
        if count:
            stats[_s(name)] = (longest, count)
    return RankRecord(
        rank=rank, world_size=world, pid=pid, attempt=attempt, proc_start=proc_start,
        host=_s(host), node=_s(node) or _s(host), role=_s(role), phase=_s(phase), phase_step=phase_step,
        phase_start=phase_start, updated=max(updated, done_updated), done_step=done_step,
        done_time=done_time, max_step_gap=max_gap, n_steps=n_steps, state=state,
        exit_code=exit_code, exit_time=exit_time, error=_s(error), phase_stats=stats,
        detail=_s(detail), session=_s(session),
    )


def read_record(path: str | os.PathLike, retries: int = 50) -> RankRecord | None:
    """Read one consistent record, or None if the file is missing or not a record yet."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        for _ in range(retries):
            s1 = os.pread(fd, 8, 0)
            buf = os.pread(fd, RECORD_SIZE, 0)
            s2 = os.pread(fd, 8, 0)
            if len(buf) < RecordLayout.END or len(s1) < 8:
                return None
            if s1 == s2 == buf[:8] and (RecordLayout.SEQ.unpack(s1)[0] % 2 == 0):
                return decode(buf)
            time.sleep(0.0005)  # a writer is mid-update; it finishes in microseconds
        # A writer died mid-update (SIGKILL between the two seq writes): its identity fields
        # (pid, host) are written once at start-up, so the record still names the rank.
        return decode(buf)
    finally:
        os.close(fd)


def read_all(monitor_dir: str | os.PathLike, world_size: int, since: float | None = None,
             session: str | None = None) -> list[RankRecord | None]:
    """Records of ranks 0..world_size-1 (None where a rank has not reported yet), and None for
    a record an earlier job left in the same run folder (a resubmission starts at attempt 0
    again, and that job's failure is not this one's):

    - with ``session`` (this batch script's ``$TULU_MONITOR_SESSION``), a record stamped with
      another session is not this job's, however recent: a resubmission can start within
      seconds of the last job's final updates;
    - a record without a stamp (written without the setup lines' environment) is judged by
      ``since`` (when this job's monitor started, ``$TULU_MONITOR_START``): one last updated
      before it is not this job's. 2 s of slack cover clock skew."""
    out = [read_record(record_path(monitor_dir, r)) for r in range(world_size)]
    stamp = session_stamp(session) if session else None
    return [r if r is not None and _this_jobs(r, since, stamp) else None for r in out]


def session_stamp(session: str) -> str:
    """``session`` as a record holds it: its first 64 bytes (UTF-8). A reader compares with this,
    so a session string longer than the field still recognises its own records."""
    return _s(session.encode("utf-8", "replace")[:RecordLayout.SESSION.size])


def _this_jobs(r: RankRecord, since: float | None, stamp: str | None) -> bool:
    if stamp and r.session:
        return r.session == stamp
    return since is None or r.updated >= since - 2.0


def monitor_session() -> str | None:
    """``$TULU_MONITOR_SESSION``: the batch script's monitor session (its job id, pid and start
    time), which every rank stamps into its record; None without the setup lines."""
    return os.environ.get("TULU_MONITOR_SESSION") or None


def monitor_start() -> float | None:
    """``$TULU_MONITOR_START``: when the batch script started the monitor (seconds since the
    epoch), or None."""
    try:
        return float(os.environ["TULU_MONITOR_START"])
    except (KeyError, ValueError):
        return None
