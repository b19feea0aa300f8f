"""Process groups of a job: each role's own world, Megatron's groups, and the bridge.

Megatron's `parallel_state` and vLLM both assume they own the default world, so each role
forms its own default world on its own rendezvous port. The bridge joins the training
group's pipeline-stage leaders with the inference ranks through a TCPStore-backed gloo group
that lives outside both worlds (DESIGN.md section 3). Call `pg.broadcast(...)` on it directly:
`dist.broadcast(group=...)` rejects a group that is not registered in the default world.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tulu.launch.task_env import TaskEnv, node_address
from tulu.plan import RankPlan, RankRole

ROLE_PORT_OFFSET = {"inference": 0, "training": 1}
BRIDGE_PORT_OFFSET = 2
WHOLE_JOB_PORT_OFFSET = 3


def backend() -> str:
    """Chosen once: NCCL where there is a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass(frozen=True, slots=True)
class Rendezvous:
    addr: str
    port: int


def role_rendezvous(plan: RankPlan, role: RankRole, env: TaskEnv) -> Rendezvous:
    first = 0 if role.role == "inference" else plan.inference_gpus
    host = env.hostnames[first // plan.gpus_per_node] if env.hostnames else env.hostname
    return Rendezvous(node_address(host), env.port_base() + ROLE_PORT_OFFSET[role.role])


def role_env(plan: RankPlan, role: RankRole, env: TaskEnv) -> dict[str, str]:
    """torchrun-style variables for the role's own world (what vLLM's external launcher reads)."""
    rdv = role_rendezvous(plan, role, env)
    local_world = plan.gpus_per_node
    return {
        "RANK": str(role.role_rank),
        "WORLD_SIZE": str(role.role_world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": rdv.addr,
        "MASTER_PORT": str(rdv.port),
    }


def init_role_world(plan: RankPlan, role: RankRole, env: TaskEnv, timeout_s: float = 1800.0) -> None:
    os.environ.update(role_env(plan, role, env))
    if backend() == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend(), init_method="env://", rank=role.role_rank,
                            world_size=role.role_world_size, timeout=datetime.timedelta(seconds=timeout_s))


def init_whole_job_world(env: TaskEnv, timeout_s: float = 1800.0) -> None:
    """One world over every task, for jobs without roles (the counter job)."""
    addr = node_address(env.hostnames[0] if env.hostnames else env.hostname)
    dist.init_process_group(backend(), init_method=f"tcp://{addr}:{env.port_base() + WHOLE_JOB_PORT_OFFSET}",
                            rank=env.global_rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


class BridgeGroup:
    """Gloo group over the training leaders + inference ranks, independent of both worlds."""

    def __init__(self, plan: RankPlan, role: RankRole, env: TaskEnv, timeout_s: float = 1800.0):
        if role.bridge_rank is None:
            raise ValueError(f"rank {role.global_rank} is not a bridge member")
        first = plan.bridge_members()[0]
        host = env.hostnames[first // plan.gpus_per_node] if env.hostnames else env.hostname
        self.rank, self.size = role.bridge_rank, plan.bridge_size
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(node_address(host), env.port_base() + BRIDGE_PORT_OFFSET, self.size,
                                   is_master=self.rank == 0, timeout=timeout, wait_for_workers=False)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("bridge", self.store), self.rank, self.size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([tensor]).wait()
        return tensor

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1))
