"""Process groups of a job: each role's own world, Megatron's groups, and the bridge.

Megatron's `parallel_state` and vLLM both assume they own the default world, so each role
forms its own default world on its own rendezvous port. The bridge joins the training
group's pipeline-stage leaders with the inference ranks through a TCPStore-backed gloo group
that lives outside both worlds (docs/design.md section 3). Call `pg.broadcast(...)` on it directly:
`dist.broadcast(group=...)` rejects a group that is not registered in the default world.

The bridge's transport is chosen once, when it is made, by where the weights live
(:func:`bridge_device_type`): NCCL groups over GPU tensors (no host copy) on a GPU node, gloo
groups over host buffers otherwise. Control traffic (barrier, all-reduce, the TCPStore's
metadata) is gloo/TCP either way; only the weight buckets take the data groups (:meth:`BridgeGroup.group`).
"""

from __future__ import annotations

import copy
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tulu.launch.task_env import TaskEnv, node_address
from tulu.plan.layout import RankPlan, RankRole

ROLE_PORT_OFFSET = {"inference": 0, "training": 1}
BRIDGE_PORT_OFFSET = 2
WHOLE_JOB_PORT_OFFSET = 3
ENGINE_PORT_OFFSET = 4  # + engine index: each vLLM engine's own world (12 engines per job at most)
MAX_ENGINES_WITH_OWN_PORT = 12


def backend() -> str:
    """Chosen once: NCCL where there is a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def bridge_device_type(local_rank: int, visible: str | None = None, cuda_built: bool | None = None) -> str:
    """"cuda" where this task has a GPU and torch was built with CUDA, else "cpu".

    Decided from the build and ``CUDA_VISIBLE_DEVICES`` only: asking CUDA itself
    (``torch.cuda.is_available()``) would fix the visible GPUs before a single-GPU engine narrows
    them (:func:`bind_task_gpu`). The local Slurm's fake GPUs on a CPU build give "cpu"."""
    cuda_built = torch.backends.cuda.is_built() if cuda_built is None else cuda_built
    return "cuda" if cuda_built and task_gpu(local_rank, visible) is not None else "cpu"


def bridge_backend(device_type: str) -> str:
    """The weight buckets' transport for tensors on ``device_type``: NCCL between GPU tensors,
    gloo between host buffers."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"bridge device {device_type!r}: expected 'cuda' or 'cpu'")
    return "nccl" if device_type == "cuda" else "gloo"


def _data_group(backend_name: str, store, rank: int, size: int, timeout: datetime.timedelta):
    """A process group (backend object: call ``.broadcast`` on it) outside the default world."""
    if backend_name == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    # GPU only: not run on the CPU machines the tests run on (bench/gpu_check.py --bridge runs it).
    # Same construction as torch's own new_group for NCCL; the communicator is made lazily, at the
    # group's first collective, on the process's current CUDA device.
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, opts)


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


def engine_env(plan: RankPlan, role: RankRole, env: TaskEnv) -> dict[str, str]:
    """torchrun-style variables for this inference rank's engine: vLLM's external launcher
    makes the engine's TP x PP ranks one world of their own."""
    per_engine = plan.inference_tp * plan.inference_pp
    engine = role.dp_rank
    if engine >= MAX_ENGINES_WITH_OWN_PORT:
        raise ValueError(f"{plan.inference_engines} inference engines; at most {MAX_ENGINES_WITH_OWN_PORT} "
                         "have rendezvous ports (use larger engines: groups.inference.tp/pp)")
    first = engine * per_engine
    host = env.hostnames[first // plan.gpus_per_node] if env.hostnames else env.hostname
    return {"RANK": str(role.role_rank - first), "WORLD_SIZE": str(per_engine), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(min(per_engine, plan.gpus_per_node)), "MASTER_ADDR": node_address(host),
            "MASTER_PORT": str(env.port_base() + ENGINE_PORT_OFFSET + engine)}


def task_gpu(local_rank: int, visible: str | None = None) -> str | None:
    """The GPU (as Slurm/CUDA name it in ``CUDA_VISIBLE_DEVICES``) that this node's task
    ``local_rank`` owns: one task per GPU, in order. None where no GPU list is visible.

    Slurm's ``--gpus-per-node`` shows every task all of its node's GPUs, so a process that takes
    "the first GPU" (a single-GPU vLLM engine does) lands on GPU 0 with its seven neighbours."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    devices = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if not devices:
        return None
    if len(devices) == 1:  # Slurm already bound this task to one GPU (--gpus-per-task, --gpu-bind)
        return devices[0]
    return devices[local_rank % len(devices)]


def bind_task_gpu(env: TaskEnv) -> str | None:
    """Show this process only its own GPU (for engines that take the first visible one)."""
    gpu = task_gpu(env.local_rank)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


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
    """The training leaders + inference ranks, independent of both worlds.

    Bridge ranks: pipeline-stage leaders first (stage s is bridge rank s), then inference ranks.
    `stage_group(s)` is the sub-group {leader s} + inference ranks, so a stage's buckets never
    travel to the other stages' leaders; `group(members)` any other sub-group weight sync routes
    through. ``device`` ("cuda"/"cpu"; None: "cuda" where CUDA is available) picks the data
    groups' transport once (:func:`bridge_backend`); on "cuda" the buffers live on the process's
    current CUDA device at the time of the sync. ``node``: the node this rank runs on (ranks of one
    node share a fast link: weight sync sends a node's bytes once and fans out there);
    None: a node of its own."""

    def __init__(self, host: str, port: int, rank: int, size: int, num_stages: int, timeout_s: float = 1800.0,
                 device: str | None = None, node: int | str | None = None):
        self.rank, self.size, self.num_stages = rank, size, num_stages
        self.device_type = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = bridge_backend(self.device_type)
        if self.backend == "nccl" and not dist.is_nccl_available():
            raise RuntimeError(f"bridge rank {rank}: device 'cuda' needs NCCL, and this torch "
                               f"({torch.__version__}) has none; make the bridge with device='cpu'")
        self.node = f"rank{rank}" if node is None else node
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=self.timeout,
                                   wait_for_workers=False)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("bridge", self.store), rank, size, self.timeout)
        self._groups: dict[tuple, tuple[object, int]] = {}

    @property
    def device(self) -> torch.device:
        """Where weight buckets live: the host, or this process's current GPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")

    @classmethod
    def for_role(cls, plan: RankPlan, role: RankRole, env: TaskEnv, timeout_s: float = 1800.0) -> "BridgeGroup":
        if role.bridge_rank is None:
            raise ValueError(f"rank {role.global_rank} is not a bridge member")
        first = plan.bridge_members()[0]
        host = env.hostnames[first // plan.gpus_per_node] if env.hostnames else env.hostname
        return cls(node_address(host), env.port_base() + BRIDGE_PORT_OFFSET, role.bridge_rank, plan.bridge_size,
                   plan.training_pp, timeout_s, device=bridge_device_type(env.local_rank),
                   node=role.global_rank // plan.gpus_per_node)

    def with_own_store(self) -> "BridgeGroup":
        """This bridge (its groups and transport) with a store client of its own, for a thread:
        a blocking get holds its client, so a thread that meets the engines through the store
        must not share the client another thread waits on."""
        view = copy.copy(self)
        view.store = self.store.clone()
        return view

    @property
    def is_inference(self) -> bool:
        return self.rank >= self.num_stages

    def stage_group(self, stage: int):
        """(process group, my rank in it) for {leader of `stage`} + inference ranks."""
        return self.group((stage, *range(self.num_stages, self.size)))

    def group(self, members: tuple[int, ...], tag: int | str | None = None, store=None):
        """(data group, my rank in it) over bridge ranks ``members`` (in that order: a broadcast's
        root is usually the first), on the bridge's transport; made once, by every member, the
        first time it is used (gloo connects there; NCCL at the first collective). Groups of the
        same members with different ``tag`` are different groups (used from different threads).
        ``store``: the client to meet through (a thread's own: a blocking get holds its client)."""
        members = tuple(members)
        key = members if tag is None else (*members, f"#{tag}")
        if key not in self._groups:
            name = ".".join(map(str, members)) + ("" if tag is None else f"#{tag}")
            prefixed = dist.PrefixStore(f"bridge/{self.backend}/{name}", store or self.store)
            my = members.index(self.rank)
            self._groups[key] = (_data_group(self.backend, prefixed, my, len(members), self.timeout), my)
        return self._groups[key]

    def broadcast(self, tensor: torch.Tensor, src: int, pg=None) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        (pg or self.pg).broadcast([tensor], opts).wait()
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([tensor]).wait()
        return tensor

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1))
