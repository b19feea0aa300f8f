"""Run micro-batches through Megatron's pipeline schedule, for training or forward only.

``get_forward_backward_func()`` picks the schedule for the layout (no pipelining at PP=1, 1F1B
otherwise). Each micro-batch's ``loss_fn(mb, output)`` runs on the last pipeline stage and
returns ``(loss sum, loss units, {metric: sum})``; Megatron divides the gradients by the loss
units of the whole global batch. :func:`reduce_sums` turns the per-micro-batch metric sums into
global-batch sums known on every rank (DP all-reduce, then from the last stage to the others).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.distributed as dist


def device() -> torch.device:
    """Where the model and its batches live: the task's GPU (NCCL) or the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_schedule(model, microbatches: Sequence[dict], loss_fn: Callable, *, seq_length: int,
                 forward_only: bool) -> list[dict]:
    """Forward (and backward unless ``forward_only``) over ``microbatches``; returns the
    ``loss_fn`` metric dicts on the last pipeline stage, ``[]`` elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["targets"])
        return output, functools.partial(loss_fn, mb)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only)


def reduce_sums(stores: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Sum ``keys`` over micro-batches, data-parallel ranks and (from the last stage) the
    pipeline: the global batch's sums, identical on every training rank."""
    from megatron.core import parallel_state as ps

    local = torch.zeros(len(keys), dtype=torch.float64, device=device())
    for d in stores:
        local += torch.stack([torch.as_tensor(d[k], dtype=torch.float64, device=local.device).detach().reshape(())
                              for k in keys])
    if ps.get_data_parallel_world_size() > 1:  # a one-rank group's all-reduce is a round trip for nothing
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:  # only the last stage holds non-zeros
        dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(keys, local.tolist()))


def train_step(policy, microbatches: Sequence[dict], loss_fn: Callable, *, lr: float,
               seq_length: int, schedule: Callable = run_schedule) -> tuple[list[dict], float]:
    """One optimizer step over the micro-batches; returns (metric dicts, gradient norm).
    ``schedule``: how micro-batches go through the model (RLVR's returns logits, not losses)."""
    policy.ddp.train()
    policy.ddp.zero_grad_buffer()
    policy.optimizer.zero_grad()
    policy.set_lr(lr)
    stores = schedule(policy.ddp, microbatches, loss_fn, seq_length=seq_length, forward_only=False)
    ok, grad_norm, _ = policy.optimizer.step()
    if not ok:
        raise FloatingPointError("the optimizer skipped the step (inf/nan gradients)")
    return stores, float(grad_norm or 0.0)


@torch.no_grad()
def forward_only(model, microbatches: Sequence[dict], loss_fn: Callable, *, seq_length: int) -> list[dict]:
    was_training = model.training
    model.eval()
    try:
        return run_schedule(model, microbatches, loss_fn, seq_length=seq_length, forward_only=True)
    finally:
        model.train(was_training)
