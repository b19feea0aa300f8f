"""Rank side: `ProgressTracker`, the tiny API training loops call at phase boundaries.

    tracker = ProgressTracker(monitor_dir, rank, world_size, role="training")
    with tracker.phase("train", step):
        ...
    tracker.step_done(step)
    tracker.exit(0)

Every call updates this rank's fixed-size record in place (an mmap'ed file, see
`monitoring.record`): no collective, no lock, no system call on the hot path, ~1-2 us. The
sidecar reads the record from another process, so it keeps working when this rank is stopped,
deadlocked while holding the GIL, or dead.

Construction also
- registers `faulthandler` on `STACK_DUMP_SIGNAL` (SIGRTMIN+5; not USR1, which NCCL uses, nor
  USR2, which submitit uses for preemption) writing all threads' Python stacks to
  ``<monitor_dir>/stacks/rank_R.txt``. faulthandler runs in C inside the signal handler, so it
  dumps even while Python code holds the GIL forever; it cannot run in a SIGSTOPped process
  (the diagnosis falls back to py-spy and /proc there);
- sets PyTorch's NCCL flight-recorder variables (unless already set) so a hang on GPU leaves
  per-rank traces in ``<monitor_dir>/nccl_trace/``: ``TORCH_NCCL_TRACE_BUFFER_SIZE`` (2000),
  ``TORCH_NCCL_DUMP_ON_TIMEOUT=1``, ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE`` (dump file stem) and
  ``TORCH_NCCL_DEBUG_INFO_PIPE_FILE`` (named-pipe stem: ProcessGroupNCCL creates
  ``<stem><rank>.pipe``; the diagnosis writes to it to request a dump). They must be set before
  the NCCL process group is created, so build the tracker first. On CPU (gloo) these variables
  are set and recorded but nothing reads them: the flight recorder is not exercised by the CPU
  tests;
- registers an `atexit` hook and chains `sys.excepthook`, so an uncaught exception records
  "failed" with the exception text and an interpreter exit without `exit()` records a clean
  exit. A SIGKILL records nothing: the sidecar notices the vanished pid instead.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import mmap
import os
import signal
import socket
import sys
import time
from pathlib import Path

from monitoring.record import (
    MAGIC, N_PHASE_SLOTS, NAME_LEN, RECORD_SIZE, STATE_EXITED, STATE_FAILED, STATE_RUNNING,
    RecordLayout as L, monitor_session, record_path,
)

__all__ = ["ProgressTracker", "STACK_DUMP_SIGNAL", "stack_file", "meta_path"]

STACK_DUMP_SIGNAL = signal.SIGRTMIN + 5

_FR_ENV_TRACE = "TORCH_NCCL_TRACE_BUFFER_SIZE"
_FR_ENV_DUMP = "TORCH_NCCL_DUMP_ON_TIMEOUT"
_FR_ENV_FILE = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"
_FR_ENV_PIPE = "TORCH_NCCL_DEBUG_INFO_PIPE_FILE"


def stack_file(monitor_dir: str | os.PathLike, rank: int) -> Path:
    return Path(monitor_dir) / "stacks" / f"rank_{rank:05d}.txt"


def meta_path(monitor_dir: str | os.PathLike, rank: int) -> Path:
    return Path(monitor_dir) / "progress" / f"rank_{rank:05d}.json"


def _b(text: str, n: int) -> bytes:
    return text.encode("utf-8", "replace")[:n]


def _proc_start_time(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - identity check is best effort
        return 0.0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:   # a full file system must not collect zero-byte leftovers
            tmp.unlink()
        except OSError:
            pass
        raise


def storage_detail(exc: BaseException | None) -> str:
    """JSON naming the storage fault behind ``exc`` (path, errno, bytes needed and free), or ""
    when it is not one. Fits the record's detail field."""
    from monitoring.storage import fault_from_exception

    fault = fault_from_exception(exc)
    if fault is None:
        return ""
    d = {k: v for k, v in fault.to_dict().items() if v not in (None, "")}
    text = json.dumps(d, sort_keys=True)
    for drop in ("what", "mount", "total_bytes"):
        if len(text.encode()) <= L.DETAIL.size:
            break
        d.pop(drop, None)
        text = json.dumps(d, sort_keys=True)
    if len(text.encode()) > L.DETAIL.size:   # a very long path: keep its end
        d["path"] = "..." + d.get("path", "")[-(L.DETAIL.size - 200):]
        text = json.dumps(d, sort_keys=True)
    return text


class ProgressTracker:
    """This rank's progress record. Cheap, non-blocking, safe to call every micro-step.

    ``node`` is the scheduler's name for this node (Slurm's ``SLURMD_NODENAME``, from the rank
    plan; default ``TULU_NODE`` or the hostname): recovery excludes culprit nodes by it.
    ``attempt`` is the job's restart count (Slurm's ``SLURM_RESTART_COUNT``): the sidecar of
    attempt N ignores records left by attempt N-1. ``from_env`` reads it from ``TULU_ATTEMPT``,
    which the monitor's setup lines export for every task. ``session`` (``from_env``:
    ``TULU_MONITOR_SESSION``, also exported by the setup lines) is stamped into the record, so
    that the monitor of a later job in the same run folder never takes it for its own.
    """

    def __init__(
        self,
        monitor_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        *,
        role: str = "",
        attempt: int = 0,
        session: str = "",
        host: str | None = None,
        node: str | None = None,
        install_hooks: bool = True,
        flight_recorder: bool = True,
    ) -> None:
        self.monitor_dir = Path(monitor_dir)
        self.rank, self.world_size, self.attempt = int(rank), int(world_size), int(attempt)
        self.host = host or socket.gethostname()
        self.node = node or os.environ.get("TULU_NODE") or self.host
        self.pid = os.getpid()
        self._stack: list[tuple[str, int, float]] = []   # enclosing phases (nesting)
        self._slots: dict[str, int] = {}
        self._longest: list[float] = [0.0] * N_PHASE_SLOTS
        self._counts: list[int] = [0] * N_PHASE_SLOTS
        self._names: dict[str, bytes] = {}
        self._seq = 0
        self._last_done_time = 0.0
        self._max_gap = 0.0
        self._n_steps = 0
        self._closed = False

        for sub in ("progress", "stacks", "nccl_trace"):
            (self.monitor_dir / sub).mkdir(parents=True, exist_ok=True)
        path = record_path(self.monitor_dir, self.rank)
        buf = bytearray(RECORD_SIZE)
        now = time.time()
        L.IDENT.pack_into(buf, L.OFF_IDENT, MAGIC, self.rank, self.world_size, self.pid,
                          self.attempt, _proc_start_time(self.pid), _b(self.host, 64),
                          _b(self.node, 64), _b(role, 16))
        L.PHASE.pack_into(buf, L.OFF_PHASE, b"", -1, now, now)
        L.DONE.pack_into(buf, L.OFF_DONE, -1, now, 0.0, 0, now)
        L.EXIT.pack_into(buf, L.OFF_EXIT, STATE_RUNNING, 0, 0.0, b"")
        L.SESSION.pack_into(buf, L.OFF_SESSION, _b(session, L.SESSION.size))
        _write_atomic(path, bytes(buf))  # a reader never sees a half-initialised record
        self._fd = os.open(path, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, RECORD_SIZE)

        self.flight_recorder_env: dict[str, str] = {}
        if flight_recorder:
            self.flight_recorder_env = self._set_flight_recorder_env()
        self._stack_fh = None
        if install_hooks:
            self._install_hooks()
        meta = {
            "rank": self.rank, "world_size": self.world_size, "pid": self.pid, "host": self.host,
            "node": self.node,
            "role": role, "attempt": self.attempt, "python": sys.executable,
            "stack_file": str(stack_file(self.monitor_dir, self.rank)),
            "stack_signal": int(STACK_DUMP_SIGNAL) if install_hooks else None,
            "flight_recorder_env": self.flight_recorder_env,
        }
        _write_atomic(meta_path(self.monitor_dir, self.rank), json.dumps(meta).encode())

    @classmethod
    def from_env(cls, rank: int, world_size: int, **kwargs) -> "ProgressTracker | None":
        """A tracker configured by the monitor's setup lines (``TULU_MONITOR_DIR``,
        ``TULU_ATTEMPT``, ``TULU_MONITOR_SESSION``), or None when the job runs without a
        monitor."""
        monitor_dir = os.environ.get("TULU_MONITOR_DIR")
        if not monitor_dir:
            return None
        kwargs.setdefault("attempt", int(os.environ.get("TULU_ATTEMPT", "0") or 0))
        kwargs.setdefault("session", monitor_session() or "")
        return cls(monitor_dir, rank, world_size, **kwargs)

    # ------------------------------------------------------------------ hot path
    def _write(self, struct_, offset: int, *values) -> None:
        mm = self._mm
        self._seq += 1
        L.SEQ.pack_into(mm, 0, self._seq)          # odd: update in progress
        struct_.pack_into(mm, offset, *values)
        self._seq += 1
        L.SEQ.pack_into(mm, 0, self._seq)          # even: consistent

    def _name(self, phase: str) -> bytes:
        b = self._names.get(phase)
        if b is None:
            b = self._names[phase] = _b(phase, NAME_LEN)
        return b

    def begin(self, phase: str, step: int = -1) -> None:
        """Enter ``phase`` at ``step``; nests inside an open phase (restored by `end`)."""
        now = time.time()
        self._stack.append((phase, step, now))
        self._write(L.PHASE, L.OFF_PHASE, self._name(phase), step, now, now)

    def end(self) -> None:
        """Leave the innermost open phase; its duration feeds the learned time-outs."""
        now = time.time()
        phase, step, start = self._stack.pop()
        self._observe(phase, now - start)
        if self._stack:   # back in the enclosing phase; its clock keeps running
            outer, ostep, ostart = self._stack[-1]
            self._write(L.PHASE, L.OFF_PHASE, self._name(outer), ostep, ostart, now)
        else:             # between phases: the idle gap is timed by the stall rule
            self._write(L.PHASE, L.OFF_PHASE, b"", step, now, now)

    def phase(self, name: str, step: int = -1) -> "_Phase":
        """``with tracker.phase("train", step): ...`` - `begin` on entry, `end` on exit."""
        return _Phase(self, name, step)

    def step_done(self, step: int) -> None:
        """Step ``step`` finished on this rank: the progress the stall rule looks for."""
        now = time.time()
        if self._n_steps:
            self._max_gap = max(self._max_gap, now - self._last_done_time)
        self._n_steps += 1
        self._last_done_time = now
        self._write(L.DONE, L.OFF_DONE, step, now, self._max_gap, self._n_steps, now)

    def _observe(self, phase: str, duration: float) -> None:
        slot = self._slots.get(phase)
        if slot is None:
            if len(self._slots) >= N_PHASE_SLOTS:
                return  # more distinct phases than slots: the rest use configured time-outs
            slot = self._slots[phase] = len(self._slots)
        self._counts[slot] += 1
        if duration > self._longest[slot]:
            self._longest[slot] = duration
        self._write(L.SLOT, L.OFF_SLOTS + slot * L.SLOT.size, self._name(phase),
                    self._longest[slot], self._counts[slot])

    # ------------------------------------------------------------------ exit
    def exit(self, rc: int = 0, error: str = "", detail: str = "") -> None:
        """Record this rank's exit: ``rc == 0`` is clean, anything else is a failure.
        ``detail``: JSON the monitor reads (`storage_detail`: a storage fault's path and bytes)."""
        if self._closed:
            return
        state = STATE_EXITED if rc == 0 and not error else STATE_FAILED
        if detail:
            self._write(L.DETAIL, L.OFF_DETAIL, _b(detail, L.DETAIL.size))
        self._write(L.EXIT, L.OFF_EXIT, state, int(rc) if rc or not error else 1, time.time(),
                    _b(error, 160))
        self._closed = True
        try:
            self._mm.flush()   # msync: on a failing device it raises EIO; the page is written
        except OSError:        # and other processes see it through the page cache anyway
            pass

    def _install_hooks(self) -> None:
        path = stack_file(self.monitor_dir, self.rank)
        path.write_text("")
        self._stack_fh = open(path, "a")   # O_APPEND: the sidecar may truncate between dumps
        faulthandler.register(STACK_DUMP_SIGNAL, file=self._stack_fh, all_threads=True,
                              chain=False)
        previous = sys.excepthook

        def excepthook(exc_type, exc, tb):
            try:
                detail = storage_detail(exc)
            except Exception:  # noqa: BLE001 - recording the failure matters more
                detail = ""
            self.exit(1, error=f"{exc_type.__name__}: {exc}", detail=detail)
            previous(exc_type, exc, tb)

        sys.excepthook = excepthook
        atexit.register(self._atexit)

    def _atexit(self) -> None:
        # The interpreter is exiting and nobody called exit() (nor did the excepthook run).
        # Python does not tell atexit the exit status (sys.exit(3) looks the same as falling off
        # the end), so record "exited, status unknown" (-1): not a crash by itself; srun's exit
        # status reaches on_exit's --rc, and peers left waiting trip the hang rule.
        if not self._closed:
            self._write(L.EXIT, L.OFF_EXIT, STATE_EXITED, -1, time.time(), b"")
            self._closed = True

    def _set_flight_recorder_env(self) -> dict[str, str]:
        base = self.monitor_dir / "nccl_trace"
        wanted = {
            _FR_ENV_TRACE: "2000",
            _FR_ENV_DUMP: "1",
            _FR_ENV_FILE: str(base / "rank_"),
            _FR_ENV_PIPE: str(base / "pipe_rank_"),
        }
        for k, v in wanted.items():
            os.environ.setdefault(k, v)
        return {k: os.environ[k] for k in wanted}

    def close(self) -> None:
        """Unmap the record (tests; a training process normally just exits)."""
        try:
            self._mm.close()
            os.close(self._fd)
        except (ValueError, OSError):
            pass


class _Phase:
    """The context manager behind `ProgressTracker.phase` (a plain class: @contextmanager
    costs ~3 us per use, more than the record update itself)."""

    __slots__ = ("tracker", "name", "step")

    def __init__(self, tracker: ProgressTracker, name: str, step: int) -> None:
        self.tracker, self.name, self.step = tracker, name, step

    def __enter__(self) -> None:
        self.tracker.begin(self.name, self.step)

    def __exit__(self, *exc) -> None:
        self.tracker.end()
