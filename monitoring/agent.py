"""The node agent: the monitor's eyes on one node of the allocation.

    python -m monitoring.agent --monitor-dir D --world-size N [--job-id J] [--attempt A]
                               [--config-json '{...}'] [--node n2]

The batch script starts one per node (one srun step, ``--overlap``, next to the job's main
step; `monitoring.recovery.setup_lines`). The sidecar, on the batch host, cannot see processes
on other nodes: their pids mean nothing in its process table. Each agent reads the progress
records of the ranks on its own node (a record names its host, node and pid), and talks to the
one decider, the sidecar, through files in the monitor dir (each written whole: temp name,
then rename):

- ``agents/<node>.json``: its heartbeat, every ``check_interval_s``: for each of its ranks the
  pid, whether it is alive, and its /proc state (``T (stopped)`` for a SIGSTOPped rank);
- ``agents/requests/<node>/<id>.json``: the sidecar asks for the stacks of some ranks;
- ``agents/responses/<id>_<node>.json``: the agent answers with `RankStack`s gathered the same
  way the sidecar gathers its own (`monitoring.stacks.collect_stacks`: faulthandler signal,
  py-spy for a stopped process, /proc otherwise), after asking its ranks' NCCL flight recorders
  for a dump (`monitoring.stacks.request_flight_recorder_dumps`: their pipes are FIFOs, which
  only a writer on the node reaches).

The sidecar side is `request_stacks` / `gather_stacks` (an agent that does not answer within
``agent_wait_s`` is named in the report) and `agent_liveness` (pids on other nodes, from fresh
heartbeats). The agent decides nothing and never touches a rank except to ask for its stack.
It exits on SIGTERM (the EXIT trap ends its step after the main step's verdict; Slurm ends it
with the job in any case: it never keeps the allocation alive), or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

from monitoring.config import MonitorConfig
from monitoring.injob import current_attempt
from monitoring.record import STATE_RUNNING, RankRecord, monitor_session, monitor_start, read_all
from monitoring.stacks import RankStack, collect_stacks, on_node, proc_state, request_flight_recorder_dumps
from monitoring.storage import _atomic_write

__all__ = ["NodeAgent", "heartbeat_path", "request_stacks", "gather_stacks", "agent_liveness",
           "rank_alive", "pid_running", "main"]

AGENTS = "agents"


def heartbeat_path(monitor_dir: str | os.PathLike, node: str) -> Path:
    return Path(monitor_dir) / AGENTS / f"{node}.json"


def _request_dir(monitor_dir: str | os.PathLike, node: str) -> Path:
    return Path(monitor_dir) / AGENTS / "requests" / node


def _response_path(monitor_dir: str | os.PathLike, req_id: str, node: str) -> Path:
    return Path(monitor_dir) / AGENTS / "responses" / f"{req_id}_{node}.json"


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, json.dumps(data, sort_keys=True).encode())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rank_alive(r: RankRecord) -> bool:
    """Whether rank r's process runs in this process table (not a zombie, not a reused pid)."""
    return pid_running(r.pid, r.proc_start)


def pid_running(pid: int, started: float = 0.0) -> bool:
    """Whether process ``pid`` runs in this process table: not a zombie, and (with ``started``,
    its start time) not a reused pid."""
    try:
        import psutil

        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if started and abs(p.create_time() - started) > 1.0:
            return False   # the pid now belongs to another process
        return True
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied on a dying process
        return os.path.exists(f"/proc/{pid}")


def log(msg: str, **fields) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    extra = (" " + json.dumps(fields, sort_keys=True, default=str)) if fields else ""
    try:
        print(f"[agent {stamp}Z] {msg}{extra}", flush=True)
    except (OSError, ValueError):
        pass


class NodeAgent:
    def __init__(self, monitor_dir: str | os.PathLike, world_size: int, cfg: MonitorConfig, *,
                 node: str, host: str | None = None, attempt: int = 0, clock=time.time,
                 job_id: str | None = None) -> None:
        self.dir = Path(monitor_dir)
        self.world_size, self.cfg, self.node, self.attempt = world_size, cfg, node, attempt
        self.job_id = job_id
        self.host = host or socket.gethostname()
        self.clock = clock
        self.since, self.session = monitor_start(), monitor_session()

    def my_ranks(self) -> list[RankRecord]:
        """This attempt's running ranks whose records say they run on this node. The attempt
        follows the job's in-job restarts (`monitoring.injob`): one agent serves every step
        of an allocation."""
        if self.job_id:
            self.attempt = current_attempt(self.dir, self.job_id, self.attempt)
        return [r for r in read_all(self.dir, self.world_size, since=self.since, session=self.session)
                if r is not None and r.attempt == self.attempt and r.state == STATE_RUNNING
                and on_node(r, self.host, self.node)]

    def heartbeat(self) -> dict:
        ranks = {str(r.rank): {"pid": r.pid, "alive": rank_alive(r), "proc_state": proc_state(r.pid)}
                 for r in self.my_ranks()}
        beat = {"node": self.node, "host": self.host, "pid": os.getpid(), "attempt": self.attempt,
                "time": self.clock(), "ranks": ranks}
        _write_json(heartbeat_path(self.dir, self.node), beat)
        return beat

    def serve_requests(self) -> list[str]:
        """Answer every pending request for this node; returns their ids."""
        done = []
        d = _request_dir(self.dir, self.node)
        try:
            pending = sorted(p for p in d.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
        except OSError:
            return done
        for path in pending:
            req = _read_json(path)
            try:
                path.unlink()
            except OSError:
                pass
            if not req or "id" not in req:
                continue
            t0 = time.monotonic()
            wanted = {int(x) for x in req.get("ranks", [])}
            mine = [r for r in self.my_ranks() if r.rank in wanted]
            # before the stacks: NCCL's watchdog may abort a hung collective at any moment
            fr = request_flight_recorder_dumps(self.dir, mine)
            stacks = collect_stacks(self.dir, mine, self.host, node=self.node,
                                    wait_s=float(req.get("wait_s", self.cfg.stack_wait_s)),
                                    use_py_spy=bool(req.get("use_py_spy", self.cfg.use_py_spy)))
            for rank in wanted - {r.rank for r in mine}:
                stacks[rank] = RankStack(rank, "none", node=self.node,
                                         note=f"no running rank {rank} of attempt {self.attempt} "
                                              f"in the records of node {self.node}")
            _write_json(_response_path(self.dir, req["id"], self.node),
                        {"id": req["id"], "node": self.node, "host": self.host, "pid": os.getpid(),
                         "seconds": round(time.monotonic() - t0, 2), "flight_recorder": fr,
                         "stacks": {str(k): v.to_dict() for k, v in stacks.items()}})
            log(f"answered request {req['id']}", ranks=sorted(wanted))
            done.append(req["id"])
        return done

    def run(self, max_seconds: float | None = None, poll_s: float = 0.1) -> int:
        log("watching", node=self.node, host=self.host, pid=os.getpid(), attempt=self.attempt,
            monitor_dir=str(self.dir))
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        next_beat = 0.0
        while deadline is None or time.monotonic() < deadline:
            now = time.monotonic()
            try:
                if now >= next_beat:
                    self.heartbeat()
                    next_beat = now + self.cfg.check_interval_s
                self.serve_requests()
            except OSError as e:   # the monitor dir failing: say so, keep trying
                log(f"cannot read or write the monitor dir: {e}")
            time.sleep(poll_s)
        return 0


# ---------------------------------------------------------------------------- sidecar side
def request_stacks(monitor_dir: str | os.PathLike, records: list[RankRecord], *,
                   wait_s: float, use_py_spy: bool) -> dict:
    """Ask each node's agent for the stacks of its ranks among ``records``; returns the
    pending request (for `gather_stacks`)."""
    req_id = f"{int(time.time() * 1000)}_{uuid.uuid4().hex[:6]}"
    by_node: dict[str, list[int]] = {}
    for r in records:
        by_node.setdefault(r.node, []).append(r.rank)
    for node, ranks in by_node.items():
        _write_json(_request_dir(monitor_dir, node) / f"{req_id}.json",
                    {"id": req_id, "ranks": ranks, "wait_s": wait_s, "use_py_spy": use_py_spy,
                     "time": time.time()})
    return {"id": req_id, "nodes": by_node, "sent": time.monotonic()}


def gather_stacks(monitor_dir: str | os.PathLike, pending: dict, timeout_s: float
                  ) -> tuple[dict[int, RankStack], dict[str, dict]]:
    """Wait (up to ``timeout_s`` after the request) for the agents' answers. Returns the
    stacks and, per node, whether its agent answered; the ranks of a node whose agent did not
    answer get a "none" stack that names the node and the agent's last heartbeat."""
    stacks: dict[int, RankStack] = {}
    agents: dict[str, dict] = {}
    waiting = dict(pending["nodes"])
    deadline = pending["sent"] + timeout_s
    while True:
        for node in list(waiting):
            resp = _read_json(_response_path(monitor_dir, pending["id"], node))
            if resp is None:
                continue
            for k, s in resp.get("stacks", {}).items():
                stacks[int(k)] = RankStack(int(k), s.get("method", "none"), text=s.get("text", ""),
                                           note=s.get("note", ""), proc_state=s.get("proc_state", ""),
                                           node=node)
            agents[node] = {"answered": True, "ranks": waiting.pop(node),
                            "seconds": round(time.monotonic() - pending["sent"], 2),
                            "agent_pid": resp.get("pid"), "host": resp.get("host"),
                            "flight_recorder": resp.get("flight_recorder") or {}}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for node, ranks in waiting.items():
        beat = _read_json(heartbeat_path(monitor_dir, node))
        seen = (f"last heartbeat {time.time() - beat['time']:.0f} s ago" if beat and "time" in beat
                else "no heartbeat ever")
        note = f"the monitor agent on {node} did not answer within {timeout_s:.0f} s ({seen})"
        agents[node] = {"answered": False, "ranks": ranks, "note": note}
        for rank in ranks:
            stacks[rank] = RankStack(rank, "none", note=note, node=node)
        try:   # a late agent must not answer a question nobody asks any more
            (_request_dir(monitor_dir, node) / f"{pending['id']}.json").unlink()
        except OSError:
            pass
    return stacks, agents


def agent_liveness(monitor_dir: str | os.PathLike, records: list[RankRecord],
                   max_age_s: float) -> dict[int, bool | None]:
    """Rank -> alive as the agent of its node last saw it (None: no heartbeat younger than
    ``max_age_s``, or one that does not know this pid)."""
    beats: dict[str, dict | None] = {}
    out: dict[int, bool | None] = {}
    now = time.time()
    for r in records:
        if r.node not in beats:
            beats[r.node] = _read_json(heartbeat_path(monitor_dir, r.node))
        beat = beats[r.node]
        seen = (beat or {}).get("ranks", {}).get(str(r.rank))
        fresh = beat is not None and now - float(beat.get("time", 0)) <= max_age_s
        out[r.rank] = bool(seen["alive"]) if fresh and seen and seen.get("pid") == r.pid else None
    return out


def main(argv: list[str] | None = None) -> int:
    from monitoring.sidecar import job_settings

    ap = argparse.ArgumentParser(prog="python -m monitoring.agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--monitor-dir", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--job-id", default=None)
    ap.add_argument("--attempt", type=int, default=None)
    ap.add_argument("--config-json", default=None)
    ap.add_argument("--node", default=None, help="this node's name (default: $SLURMD_NODENAME)")
    ap.add_argument("--max-seconds", type=float, default=None)
    args = ap.parse_args(argv)
    cfg, job_id, attempt = job_settings(args)
    node = args.node or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return NodeAgent(args.monitor_dir, args.world_size, cfg, node=node, attempt=attempt,
                     job_id=job_id).run(args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
