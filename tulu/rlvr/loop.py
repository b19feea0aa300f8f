"""Entry of an RLVR `train` job: each task runs its role's side of the step loop."""

from __future__ import annotations

import os


def share_cores(tasks_per_node: int) -> int:
    """Intra-op threads for this task when nobody chose them: the node's cores split between its
    tasks. Under Slurm, OMP_NUM_THREADS (cluster.cpus_per_task) decides; without it (the local
    executor) torch would give every task all the cores, and the inference and training
    processes, which run at the same time with rlvr.async_steps >= 1, would oversubscribe them."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, tasks_per_node)))
    return torch.get_num_threads()


def run(ctx) -> dict:
    share_cores(ctx.plan.gpus_per_node)
    if ctx.role.role == "inference":
        from tulu.rlvr.inference_worker import run as run_inference

        return run_inference(ctx)
    from tulu.rlvr.learner import run as run_learner

    return run_learner(ctx)
