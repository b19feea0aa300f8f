"""Storage faults: a full, over-quota, read-only or failing file system under the run folder.

A multi-day run writes checkpoints, logs and monitor records to a shared file system, and
ENOSPC (full), EDQUOT (quota), EROFS (remounted read-only) and EIO (device error) are among the
commonest ways it dies. This module gives them one shape, `StorageFault` (path, errno, bytes
needed and free), and keeps the monitor itself alive when its own folder cannot be written:

- `fault_from_exception`: is this exception (or its cause) one of them;
- `fault_from_text`: the same from a rank's recorded error or a log line (``[Errno 28] ...``);
- `disk_usage(path)`: free and total bytes of the file system holding ``path``;
- `MonitorFiles`: the monitor's writes (reports, decisions, markers, learned time-outs) go to
  the monitor dir first and, when that fails, to a fallback folder (``MonitorConfig.fallback_dir``,
  default ``$TMPDIR/tulu-monitor-<uid>/<job>`` on the batch host, where the sidecar and the EXIT
  trap both run); reads look in both. A failed write never leaves its temp file behind and never
  raises: the caller keeps its decision in memory and goes on.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["STORAGE_ERRNOS", "StorageFault", "fault_from_exception",
           "fault_from_text", "disk_usage", "human_bytes", "MonitorFiles", "files", "configure",
           "files_for", "say", "default_fallback_dir"]

STORAGE_ERRNOS: dict[int, str] = {
    _errno.ENOSPC: "ENOSPC", _errno.EDQUOT: "EDQUOT", _errno.EROFS: "EROFS", _errno.EIO: "EIO",
}
_BY_NAME = {v: k for k, v in STORAGE_ERRNOS.items()}
_ADVICE = {
    "ENOSPC": "free space on that file system",
    "EDQUOT": "free space or raise the quota (e.g. lfs quota / quota -s)",
    "EROFS": "the file system is read-only: ask for it to be remounted read-write",
    "EIO": "the device returns I/O errors: check the file system (dmesg) before writing again",
}
_TEXT_ERRNO = re.compile(r"\[Errno (?P<n>\d+)\] (?P<msg>[^:'\"\n]*?)(?:: '(?P<path>[^']*)')?(?:$|[\n\"'])")
_TEXT_NAME = re.compile(r"\b(?P<name>ENOSPC|EDQUOT|EROFS|EIO)\b")
_TEXT_STRERROR = {os.strerror(n): n for n in STORAGE_ERRNOS}


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_usage(path: str | os.PathLike) -> tuple[int, int, str] | None:
    """(free bytes for an unprivileged writer, total bytes, mount point) of the file system that
    holds ``path`` (its nearest existing parent), or None if none can be read."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    mount = p
    try:
        dev = os.stat(p).st_dev
        while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
    except OSError:
        pass
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, str(mount)


@dataclass(frozen=True, slots=True)
class StorageFault:
    """One storage error: where, which errno, and the space it needed and found."""

    errno: int
    name: str                       # "ENOSPC" | "EDQUOT" | "EROFS" | "EIO"
    path: str                       # the file or folder being written ("" if unknown)
    needed_bytes: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None
    mount: str = ""
    what: str = ""                  # e.g. "checkpoint step 40", "monitor report"

    @property
    def advice(self) -> str:
        return _ADVICE.get(self.name, "check the file system")

    def line(self) -> str:
        """One line for `tulu status`, the report summary and the Slurm job comment."""
        space = ""
        if self.needed_bytes is not None or self.free_bytes is not None:
            space = (f"; needs {human_bytes(self.needed_bytes)}, {human_bytes(self.free_bytes)} free"
                     + (f" of {human_bytes(self.total_bytes)}" if self.total_bytes else "")
                     + (f" on {self.mount}" if self.mount else ""))
        what = f" ({self.what})" if self.what else ""
        return f"{self.name} ({os.strerror(self.errno)}) writing {self.path or '?'}{what}{space}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StorageFault | None":
        try:
            n = int(d.get("errno") or _BY_NAME[d["name"]])
        except (KeyError, TypeError, ValueError):
            return None
        if n not in STORAGE_ERRNOS:
            return None
        return cls(errno=n, name=STORAGE_ERRNOS[n], path=str(d.get("path") or ""),
                   needed_bytes=_int(d.get("needed_bytes")), free_bytes=_int(d.get("free_bytes")),
                   total_bytes=_int(d.get("total_bytes")), mount=str(d.get("mount") or ""),
                   what=str(d.get("what") or ""))

    def with_space(self) -> "StorageFault":
        """The same fault with the file system's free/total bytes filled in where missing (read
        now: after a failed write they show what is left)."""
        if self.free_bytes is not None and self.mount:
            return self
        usage = disk_usage(self.path) if self.path else None
        if usage is None:
            return self
        free, total, mount = usage
        return StorageFault(self.errno, self.name, self.path, self.needed_bytes,
                            self.free_bytes if self.free_bytes is not None else free,
                            self.total_bytes or total, self.mount or mount, self.what)


def _int(v) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def fault_from_exception(exc: BaseException | None, *, path: str | os.PathLike = "",
                         needed_bytes: int | None = None, what: str = "") -> StorageFault | None:
    """A `StorageFault` for ``exc`` when it (or its cause) is a storage error. Attributes
    ``needed_bytes``, ``free_bytes``, ``total_bytes``, ``mount``, ``what`` on the exception (the
    training side's checkpoint errors carry them) are used when present."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            carried = _int(getattr(e, "needed_bytes", None))
            return StorageFault(
                errno=e.errno, name=STORAGE_ERRNOS[e.errno],
                path=str(e.filename or path or ""),
                needed_bytes=carried if carried is not None else needed_bytes,
                free_bytes=_int(getattr(e, "free_bytes", None)),
                total_bytes=_int(getattr(e, "total_bytes", None)),
                mount=str(getattr(e, "mount", "") or ""),
                what=str(getattr(e, "what", "") or what)).with_space()
    return None


def fault_from_text(text: str | None) -> StorageFault | None:
    """A storage fault named in a line of text: a JSON detail written by the rank's excepthook,
    ``[Errno 28] No space left on device: '/path'``, or a bare ``ENOSPC``/strerror."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            return StorageFault.from_dict(json.loads(text))
        except ValueError:
            pass
    for m in _TEXT_ERRNO.finditer(text):
        n = int(m.group("n"))
        if n in STORAGE_ERRNOS:
            return StorageFault(n, STORAGE_ERRNOS[n], m.group("path") or "")
    for msg, n in _TEXT_STRERROR.items():
        if msg in text:
            return StorageFault(n, STORAGE_ERRNOS[n], "")
    m = _TEXT_NAME.search(text)
    if m:
        n = _BY_NAME[m.group("name")]
        return StorageFault(n, m.group("name"), "")
    return None


def default_fallback_dir(job_id: str | None) -> Path:
    base = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    return base / f"tulu-monitor-{os.getuid()}" / f"job_{job_id or 'local'}"


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp name + rename; the temp file is removed when any step fails (a full file system
    must not collect zero-byte leftovers)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(_errno.ENOSPC, os.strerror(_errno.ENOSPC), str(path))
    finally:
        os.close(fd)


class MonitorFiles:
    """The monitor's writes: the monitor dir (``primary``) first, then ``fallback``.

    Every write returns the path it landed at, or None when neither place took it; it never
    raises. Failures are remembered in ``failures`` (as `StorageFault` dicts when they are
    storage errors) so the report can name them. Paths outside ``primary`` fall back to
    ``fallback / name``."""

    def __init__(self, primary: str | os.PathLike | None = None,
                 fallback: str | os.PathLike | None = None, *, retries: int = 1,
                 retry_wait_s: float = 0.2) -> None:
        self.primary = Path(primary) if primary else None
        self.fallback = Path(fallback) if fallback else None
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.failures: list[dict] = []

    def fallback_for(self, path: str | os.PathLike) -> Path | None:
        if self.fallback is None:
            return None
        p = Path(path)
        if self.primary is not None:
            try:
                return self.fallback / p.absolute().relative_to(self.primary.absolute())
            except ValueError:
                pass
        return self.fallback / p.name

    def _note(self, path: Path, e: OSError, what: str) -> None:
        f = fault_from_exception(e, path=path, what=what)
        entry = f.to_dict() if f else {"errno": e.errno, "name": _errno.errorcode.get(e.errno or 0, "?"),
                                       "path": str(path), "what": what, "error": str(e)}
        entry["time"] = time.time()
        if len(self.failures) < 100:
            self.failures.append(entry)

    @property
    def storage_faults(self) -> list[StorageFault]:
        out = []
        for d in self.failures:
            f = StorageFault.from_dict(d)
            if f is not None:
                out.append(f)
        return out

    def _try(self, op, path: Path, data: bytes, what: str) -> bool:
        for i in range(self.retries + 1):
            try:
                op(path, data)
                return True
            except OSError as e:
                if i == self.retries:
                    self._note(path, e, what)
                else:
                    time.sleep(self.retry_wait_s)
        return False

    def write_text(self, path: str | os.PathLike, text: str, what: str = "") -> Path | None:
        """Atomically write ``text``; returns where it landed (or None)."""
        return self._write(_atomic_write, Path(path), text.encode(), what)

    def append_line(self, path: str | os.PathLike, line: str, what: str = "") -> Path | None:
        return self._write(_append, Path(path), line.encode(), what)

    def _write(self, op, path: Path, data: bytes, what: str) -> Path | None:
        if self._try(op, path, data, what or path.name):
            return path
        alt = self.fallback_for(path)
        if alt is not None and alt != path and self._try(op, alt, data, what or path.name):
            return alt
        return None

    def candidates(self, path: str | os.PathLike) -> list[Path]:
        alt = self.fallback_for(path)
        return [Path(path)] + ([alt] if alt is not None and alt != Path(path) else [])

    def read_text(self, path: str | os.PathLike) -> str | None:
        """The newest readable copy (monitor dir or fallback), or None."""
        found = []
        for p in self.candidates(path):
            try:
                found.append((p.stat().st_mtime, p.read_text()))
            except OSError:
                continue
        return max(found)[1] if found else None

    def read_lines(self, path: str | os.PathLike) -> list[str]:
        """Lines of every copy (an append-only log split across both places)."""
        out: list[str] = []
        for p in self.candidates(path):
            try:
                out += p.read_text().splitlines()
            except OSError:
                continue
        return out

    def exists(self, path: str | os.PathLike) -> bool:
        return any(p.exists() for p in self.candidates(path))

    def unlink(self, path: str | os.PathLike) -> None:
        for p in self.candidates(path):
            try:
                p.unlink()
            except OSError:
                pass


# The process's instance: configured once by the sidecar / EXIT trap (`configure`); the
# unconfigured default only spills into the default fallback folder of job "local".
files = MonitorFiles()


def configure(monitor_dir: str | os.PathLike | None, fallback_dir: str | os.PathLike | None,
              job_id: str | None) -> MonitorFiles:
    global files
    fallback = Path(fallback_dir) / f"job_{job_id or 'local'}" if fallback_dir else \
        default_fallback_dir(job_id)
    files = MonitorFiles(monitor_dir, fallback)
    return files


def files_for(monitor_dir: str | os.PathLike, *, fallback_dir: str | os.PathLike | None = None,
              job_id: str | None = None) -> MonitorFiles:
    """The configured instance when it serves ``monitor_dir`` (and no other fallback is asked
    for); otherwise one for ``monitor_dir`` with ``fallback_dir``/job (`tulu status` reading a
    finished job's report) or the process's fallback."""
    if fallback_dir is None and job_id is None and files.primary is not None and \
            Path(monitor_dir).absolute() == files.primary.absolute():
        return files
    job = job_id or os.environ.get("SLURM_JOB_ID")
    if fallback_dir:
        fallback = Path(fallback_dir) / f"job_{job or 'local'}"
    elif job_id is None and files.fallback is not None:
        fallback = files.fallback
    else:
        fallback = default_fallback_dir(job)
    return MonitorFiles(monitor_dir, fallback)


def say(msg: str) -> bool:
    """Print a line to stdout, else stderr; False if neither took it (both on a full disk)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.write(msg + "\n")
            stream.flush()
            return True
        except (OSError, ValueError):
            continue
    return False
