"""Fault injection for tests and for users who want to see the monitor work.

Select faults with ``TULU_FAULT`` (or `parse_faults` on a config string); several are
separated by ``;``:

    TULU_FAULT="kind=sigstop,rank=3,step=2"
    TULU_FAULT="kind=straggler,rank=1,step=0,seconds=0.5;kind=hang_checkpoint,rank=0,step=4"

Fields: ``kind`` (below), ``rank`` (default: every rank), ``step`` (default 0),
``point`` (the named place in the loop; default: any point, except the hang_* kinds which
default to their phase), ``restart`` (``0`` by default: fire only on the first attempt, so
the requeued job runs clean; ``any``, or a number), ``seconds`` (straggler delay, default 1).
Point ``start`` (step 0) is a task before its rendezvous, where its peers wait for it; a fault
fires there only when it names it (``point=start``).

Kinds:
- ``sigstop``: the rank stops itself (a hang; faulthandler cannot dump a stopped process);
- ``skip_collective``: the rank never enters the collective its peers are in (sleeps forever);
- ``sigkill``: the rank dies without a trace (no exit record, no traceback);
- ``exception``: raises `InjectedFault` (the excepthook records the failure);
- ``straggler``: sleeps ``seconds`` at every matching point from ``step`` on (slow but
  progressing: must NOT be reported);
- ``hang_weight_sync`` / ``hang_checkpoint``: sleep forever at point ``weight_sync`` /
  ``checkpoint``;
- ``gil_hang``: blocks in C while holding the GIL (no Python thread of the rank runs again;
  faulthandler still dumps from its signal handler);
- ``enospc``: fills the file system of the run folder (``$TULU_RUN_DIR``, else the cwd) with a
  file ``tulu-fault-fill.<pid>`` in that folder, until the file system refuses more
  (ENOSPC, or EDQUOT under a quota); then the rank goes on and meets the full disk at its next
  write. Delete the file to free the space. Use a small file system (a tmpfs), not a shared
  one. Point ``checkpoint_write`` (inside `CheckpointManager.save`, after its free-space check)
  makes a save fail midway; point ``checkpoint`` (before the save) meets that check;
- ``eio``: the device under the run folder starts failing (EIO): the folder must be on a
  loop-mounted file system (``mount -o loop img DIR``; root), whose backing file is cut to 8 MiB
  (the first block group's metadata stays readable) and the loop device told so: data written
  beyond it fails with EIO when it is flushed (fsync).

Loops call ``maybe_inject(point, step, rank, restart=...)`` at named points; the restart count
is passed in (the rank plan knows it), never read from Slurm here. Without ``TULU_FAULT`` the
call is one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

__all__ = ["FaultSpec", "InjectedFault", "parse_faults", "maybe_inject", "KINDS", "ENV"]

ENV = "TULU_FAULT"
KINDS = ("sigstop", "skip_collective", "sigkill", "exception", "straggler",
         "hang_weight_sync", "hang_checkpoint", "gil_hang", "enospc", "eio")
_DEFAULT_POINT = {"hang_weight_sync": "weight_sync", "hang_checkpoint": "checkpoint"}
# Points a fault fires at only when it names them: "start" (a task, before its rendezvous)
# comes before step 0 of the loop, where a fault without a point has always fired.
_NAMED_ONLY = ("start",)


class InjectedFault(RuntimeError):
    """Raised by the ``exception`` fault."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    rank: int | None = None
    step: int = 0
    point: str | None = None
    restart: str = "0"
    seconds: float = 1.0

    def matches(self, point: str, step: int, rank: int, restart: int) -> bool:
        if self.rank is not None and rank != self.rank:
            return False
        if self.point is not None and point != self.point:
            return False
        if self.point is None and point in _NAMED_ONLY:
            return False
        if self.restart != "any" and int(self.restart) != restart:
            return False
        return step >= self.step if self.kind == "straggler" else step == self.step


def parse_faults(text: str | None) -> list[FaultSpec]:
    """``"kind=sigstop,rank=3,step=2;kind=..."`` -> specs. Errors name the bad field."""
    specs = []
    for chunk in (text or "").split(";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        fields: dict[str, str] = {}
        for item in chunk.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{ENV}: {item!r} in {chunk!r} is not key=value")
            fields[key.strip()] = value.strip()
        valid = ("kind", "rank", "step", "point", "restart", "seconds")
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise ValueError(f"{ENV}: unknown field(s) {unknown} in {chunk!r}; valid: {valid}")
        kind = fields.get("kind", "")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: kind={kind!r} in {chunk!r}; valid kinds: {KINDS}")
        restart = fields.get("restart", "0")
        if restart != "any" and not restart.isdigit():
            raise ValueError(f"{ENV}: restart={restart!r} must be a number or 'any'")
        specs.append(FaultSpec(
            kind=kind, rank=int(fields["rank"]) if "rank" in fields else None,
            step=int(fields.get("step", 0)),
            point=fields.get("point") or _DEFAULT_POINT.get(kind),
            restart=restart, seconds=float(fields.get("seconds", 1.0))))
    return specs


_cache: dict[str, list[FaultSpec]] = {}
_fired: set[FaultSpec] = set()


def maybe_inject(point: str, step: int, rank: int, restart: int = 0,
                 specs: list[FaultSpec] | None = None) -> None:
    """Fire the matching fault, if any (each non-straggler fault fires once per process)."""
    if specs is None:
        text = os.environ.get(ENV)
        if not text:
            return
        specs = _cache.get(text)
        if specs is None:
            specs = _cache[text] = parse_faults(text)
    for spec in specs:
        if spec in _fired or not spec.matches(point, step, rank, restart):
            continue
        if spec.kind != "straggler":
            _fired.add(spec)
        _fire(spec, point, step, rank)


def _fire(spec: FaultSpec, point: str, step: int, rank: int) -> None:
    where = f"{spec.kind} at point {point!r} step {step} on rank {rank}"
    if spec.kind == "straggler":
        time.sleep(spec.seconds)
        return
    print(f"[tulu fault injection] {where}", flush=True)
    if spec.kind == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif spec.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec.kind == "exception":
        raise InjectedFault(f"injected fault: {where}")
    elif spec.kind == "gil_hang":
        _hold_gil_forever()
    elif spec.kind == "enospc":
        folder = os.environ.get("TULU_RUN_DIR") or os.getcwd()
        filled = fill_file_system(folder)
        print(f"[tulu fault injection] filled {folder}'s file system with {filled} bytes", flush=True)
    elif spec.kind == "eio":
        folder = os.environ.get("TULU_RUN_DIR") or os.getcwd()
        print(f"[tulu fault injection] {break_loop_device(folder)}", flush=True)
    else:  # skip_collective, hang_weight_sync, hang_checkpoint
        _sleep_forever()


def fill_file_system(folder: str | os.PathLike, chunk: int = 1 << 20) -> int:
    """Write ``folder/tulu-fault-fill.<pid>`` until its file system is full; bytes written."""
    path = os.path.join(os.fspath(folder), f"tulu-fault-fill.{os.getpid()}")
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (chunk, 4096, 512):
            block = b"\0" * size
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        break
                    raise
                written += n
                if n < size:
                    break
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    if written == 0:
        try:
            os.unlink(path)
        except OSError:
            pass
    return written


def _mount_source(folder: str | os.PathLike) -> tuple[str, str]:
    """(device, mount point) of the file system holding ``folder`` (/proc/self/mountinfo)."""
    path = os.path.realpath(folder)
    best = ("", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount = left.split()[4].replace("\\040", " ")
            source = right.split()[1] if len(right.split()) > 1 else ""
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                best = (source, mount)
    return best


def break_loop_device(folder: str | os.PathLike, keep_bytes: int = 8 << 20) -> str:
    """Make the loop device under ``folder`` fail: cut its backing file to ``keep_bytes`` and tell
    the loop driver (LOOP_SET_CAPACITY). Returns what it did; raises ValueError when ``folder``
    is not on a loop device."""
    import fcntl

    device, mount = _mount_source(folder)
    name = os.path.basename(device)
    if not name.startswith("loop"):
        raise ValueError(f"the eio fault needs {folder} on a loop-mounted file system; it is on "
                         f"{device or '?'} ({mount})")
    with open(f"/sys/block/{name}/loop/backing_file") as f:
        backing = f.read().strip()
    os.truncate(backing, keep_bytes)
    fd = os.open(device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x4C07)   # LOOP_SET_CAPACITY: the device now ends at keep_bytes
    finally:
        os.close(fd)
    return f"{device} under {mount} now fails past {keep_bytes} bytes (backing file {backing})"


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _hold_gil_forever() -> None:
    import ctypes

    libc = ctypes.PyDLL(None)       # PyDLL: the GIL stays held during the call
    while True:
        libc.sleep(3600)
