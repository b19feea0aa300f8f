"""Where a task learns who it is: the ONE module that reads Slurm's (or submitit's) environment.

Everything downstream gets a `TaskEnv`; training code never sees `SLURM_*`.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
from dataclasses import dataclass

import submitit
from submitit.slurm.slurm import _parse_node_list

PORT_FLOOR = 20000
PORT_SLOTS = (32768 - PORT_FLOOR) // 64  # 199 jobs' port blocks, each 64 wide


@dataclass(frozen=True, slots=True)
class TaskEnv:
    global_rank: int
    world_size: int
    node: int
    local_rank: int
    hostnames: tuple[str, ...]
    job_id: str
    restart_count: int
    cluster: str  # "slurm" or "local"

    @property
    def hostname(self) -> str:
        return self.hostnames[self.node] if self.hostnames else socket.gethostname()

    def port_base(self) -> int:
        """First of 16 rendezvous ports for this attempt of this job (see tulu.dist.groups).

        A requeued attempt shifts the ports so it never races the previous attempt's
        sockets in TIME_WAIT; two jobs sharing a host (the local cluster) differ by job id. All
        ports stay in 20000..32767, below Linux's default ephemeral range (32768-60999): a port
        there can be taken at any moment by some process's outgoing connection."""
        digits = "".join(ch for ch in self.job_id if ch.isdigit()) or "0"
        return PORT_FLOOR + (int(digits) % PORT_SLOTS) * 64 + (self.restart_count % 4) * 16


def current() -> TaskEnv:
    env = submitit.JobEnvironment()
    cluster = env.cluster
    # The monitor's attempt (TULU_ATTEMPT, set by the batch script) counts in-job restarts on
    # spare nodes as well as requeues; Slurm's restart count only the latter.
    restart = int(os.environ.get("TULU_ATTEMPT") or os.environ.get("SLURM_RESTART_COUNT", "0") or 0) \
        if cluster == "slurm" else 0
    try:
        # The step's nodes: with spare nodes the job holds more than the step runs on, and
        # SLURM_NODEID numbers the step's (submitit's hostnames are the job's).
        step_nodes = os.environ.get("SLURM_STEP_NODELIST") if cluster == "slurm" else None
        hostnames = tuple(_parse_node_list(step_nodes) if step_nodes else env.hostnames)
    except Exception:  # local executor: one host
        hostnames = (socket.gethostname(),)
    return TaskEnv(
        global_rank=env.global_rank,
        world_size=env.num_tasks,
        node=env.node,
        local_rank=env.local_rank,
        hostnames=hostnames,
        job_id=str(env.job_id),
        restart_count=restart,
        cluster="slurm" if cluster == "slurm" else "local",
    )


@functools.lru_cache(maxsize=64)
def node_address(hostname: str) -> str:
    """An address other nodes can connect to. Real clusters resolve node names; the local
    test cluster's nodes (n1..n4) are only known to Slurm, so ask it for NodeAddr."""
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", hostname], capture_output=True, text=True, timeout=30).stdout
        for token in out.split():
            if token.startswith("NodeAddr="):
                return token.split("=", 1)[1]
    except (OSError, subprocess.TimeoutExpired):
        pass
    raise RuntimeError(f"cannot resolve node {hostname!r} to an address (DNS and scontrol failed)")
