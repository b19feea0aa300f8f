"""The training group's world, shared by SFT/DPO (`tulu.train.loop`) and RLVR (`tulu.rlvr.learner`):
the role's own default world, Megatron's TP/PP/DP groups inside it, seeded RNGs; and its teardown."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def form_training_world(ctx) -> tuple[int, int]:
    """Join the role's world (time-outs outlast the monitor's, so it names a hang first), form
    Megatron's groups, seed; returns (DP size, this rank's DP rank)."""
    from megatron.core import parallel_state as ps

    from tulu.dist import groups as tdist
    from tulu.models import megatron_cpu

    cfg = ctx.cfg
    tdist.init_role_world(ctx.plan, ctx.role, ctx.env, timeout_s=cfg.monitoring.collective_timeout_s)
    megatron_cpu.apply()
    ps.initialize_model_parallel(ctx.plan.training_tp, ctx.plan.training_pp)
    seed_everything(cfg.run.seed)
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def close_training_world(metrics=None) -> None:
    """After the last step: flush metrics, wait for every rank, tear Megatron's groups down."""
    from megatron.core import parallel_state as ps

    if metrics:
        metrics.close()
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
