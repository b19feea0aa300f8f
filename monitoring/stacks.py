"""Python stacks of live ranks, by whichever means works for the process's state.

- A running process (even one deadlocked while holding the GIL): send `STACK_DUMP_SIGNAL`; the
  rank's `faulthandler` writes every thread's stack to ``stacks/rank_R.txt`` from C.
- A stopped process (SIGSTOP, state ``T``): a signal handler cannot run until it is continued,
  so faulthandler is useless. ``py-spy dump --nonblocking`` reads its memory without resuming
  it, when py-spy is installed and ptrace is allowed; otherwise /proc's state and wchan say
  at least where the kernel holds it.
- A rank on another node: its pid means nothing here (another host, or another PID namespace
  on the isolated local Slurm); that node's agent gathers it the same way (`monitoring.agent`).
  A process is local when its record names this host and, under Slurm, this node (`on_node`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from monitoring.progress import STACK_DUMP_SIGNAL, meta_path, stack_file
from monitoring.record import RankRecord

__all__ = ["RankStack", "collect_stacks", "on_node", "proc_state", "innermost_frame",
           "request_flight_recorder_dumps"]


@dataclass(slots=True)
class RankStack:
    rank: int
    method: str          # "faulthandler" | "py-spy" | "proc" | "none"
    text: str = ""
    note: str = ""
    proc_state: str = ""  # /proc/<pid>/status State, e.g. "S (sleeping)", "T (stopped)"
    node: str = ""        # the node whose process table it was read from ("" = the sidecar's)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "method": self.method, "proc_state": self.proc_state,
                "note": self.note, "text": self.text, "node": self.node}


def on_node(r: RankRecord, host: str, node: str | None) -> bool:
    """Whether rank r's pid is meaningful here: same host and, when this process knows its
    Slurm node (``node``), the same node (local Slurm nodes share a host, not a PID namespace)."""
    return r.host == host and (not node or r.node == node)


def proc_state(pid: int) -> str:
    """The ``State:`` line of /proc/<pid>/status ("" when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip() or "0"
    except OSError:
        return "?"


def _py_spy(pid: int, timeout: float = 10.0) -> tuple[str, str]:
    """(stack text, note). Empty text when py-spy is missing or failed."""
    beside = Path(sys.executable).with_name("py-spy")   # installed in the same venv
    exe = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if not exe:
        return "", "py-spy not installed"
    try:
        out = subprocess.run([exe, "dump", "--nonblocking", "--pid", str(pid)],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "", f"py-spy dump timed out after {timeout:.0f} s"
    if out.returncode != 0:
        return "", f"py-spy dump failed ({out.returncode}): {out.stderr.strip()[-300:]}"
    return out.stdout, ""


def collect_stacks(monitor_dir: str | os.PathLike, records: list[RankRecord], host: str,
                   wait_s: float = 3.0, use_py_spy: bool = True,
                   node: str | None = None) -> dict[int, RankStack]:
    """Stacks of the given ranks; signals are sent to all local ranks at once, then gathered.
    A rank not on this host/node (`on_node`) gets a "none" stack saying so."""
    result: dict[int, RankStack] = {}
    pending: dict[int, Path] = {}
    for r in records:
        if not on_node(r, host, node):
            where = f"node {r.node}" if node and r.host == host else f"host {r.host}"
            result[r.rank] = RankStack(r.rank, "none", note=f"on {where}, not reachable from "
                                       f"{('node ' + node) if node else 'host ' + host}")
            continue
        state = proc_state(r.pid)
        if not state:
            result[r.rank] = RankStack(r.rank, "none", note=f"pid {r.pid} is gone")
            continue
        if state.startswith(("T", "t")):
            note = (f"process is stopped ({state}): faulthandler cannot run in a stopped "
                    f"process; wchan={_wchan(r.pid)}")
            text, why = _py_spy(r.pid) if use_py_spy else ("", "py-spy disabled")
            result[r.rank] = RankStack(r.rank, "py-spy" if text else "proc", text=text,
                                       note=note + (f"; {why}" if why else ""),
                                       proc_state=state)
            continue
        path = stack_file(monitor_dir, r.rank)
        try:
            os.truncate(path, 0)
            os.kill(r.pid, STACK_DUMP_SIGNAL)
            pending[r.rank] = path
            result[r.rank] = RankStack(r.rank, "faulthandler", proc_state=state)
        except OSError as e:
            result[r.rank] = RankStack(r.rank, "none", note=f"cannot signal pid {r.pid}: {e}",
                                       proc_state=state)

    deadline = time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        for rank, path in list(pending.items()):
            text = _complete_dump(path)
            if text:
                result[rank].text = text
                del pending[rank]
    by_rank = {r.rank: r for r in records}
    for rank, path in list(pending.items()):   # no dump: signal blocked, D state, or a C-level wedge
        rec = by_rank[rank]
        text, why = _py_spy(rec.pid) if use_py_spy else ("", "py-spy disabled")
        partial = path.read_text(errors="replace") if path.exists() else ""
        result[rank] = RankStack(
            rank, "py-spy" if text else "proc", text=text or partial,
            note=f"no faulthandler dump within {wait_s:.1f} s (state {proc_state(rec.pid)}, "
                 f"wchan={_wchan(rec.pid)})" + (f"; {why}" if why else ""),
            proc_state=proc_state(rec.pid))
    for r in records:
        if on_node(r, host, node):
            result[r.rank].node = node or ""
    return result


def _complete_dump(path: Path) -> str:
    """The dump text once faulthandler has finished writing it (ends with a blank line after
    the last thread), else ""."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    if "most recent call first" not in text:
        return ""
    # faulthandler writes the threads one after another; give it a moment to finish.
    time.sleep(0.05)
    return path.read_text(errors="replace")


def innermost_frame(text: str) -> str:
    """``file:function`` of the main thread's innermost frame, from a faulthandler or py-spy
    dump; "" if none. The main thread is the one whose outermost frame is not threading's
    ``_bootstrap`` (other threads start there)."""
    threads: list[list[str]] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("Thread ", "Current thread ")):
            threads.append([])
        elif s.startswith("File ") and threads:           # faulthandler
            # File "/x/y.py", line 12 in func
            try:
                file = s.split('"')[1]
                func = s.rsplit(" in ", 1)[1]
            except IndexError:
                continue
            threads[-1].append(f"{Path(file).name}:{func}")
        elif s.endswith(")") and " (" in s and threads:  # py-spy: func (file.py:12)
            func, loc = s[:-1].rsplit(" (", 1)
            threads[-1].append(f"{Path(loc.rsplit(':', 1)[0]).name}:{func}")
    for frames in threads:
        if frames and not frames[-1].endswith("threading.py:_bootstrap"):
            return frames[0]
    return threads[0][0] if threads and threads[0] else ""


def request_flight_recorder_dumps(monitor_dir: str | os.PathLike,
                                  records: list[RankRecord]) -> dict:
    """Ask PyTorch's NCCL flight recorder of each of ``records`` (ranks on this node) for a dump
    (GPU only).

    ProcessGroupNCCL creates ``<TORCH_NCCL_DEBUG_INFO_PIPE_FILE><rank>.pipe`` and dumps its
    trace to ``<TORCH_NCCL_DEBUG_INFO_TEMP_FILE><rank>`` when something is written to it. The
    pipe is a FIFO: a writer reaches it only on the rank's node (the sidecar for its own node's
    ranks, each node's agent for its own). On CPU (gloo) no pipe exists and this returns what it
    looked for; the tests play ProcessGroupNCCL's reader with a FIFO of their own."""
    out = {"requested": [], "missing_pipe": [], "dump_files": []}
    for r in records:
        try:
            meta = json.loads(meta_path(monitor_dir, r.rank).read_text())
        except (OSError, ValueError):
            continue
        env = meta.get("flight_recorder_env") or {}
        stem = env.get("TORCH_NCCL_DEBUG_INFO_PIPE_FILE")
        if not stem:
            continue
        pipe = f"{stem}{r.rank}.pipe"
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"1")
            os.close(fd)
            out["requested"].append(r.rank)
        except OSError:
            out["missing_pipe"].append(r.rank)
        dump = env.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
        if dump:
            out["dump_files"].append(f"{dump}{r.rank}")
    return out
