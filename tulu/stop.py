"""Graceful stop: the warning signal before a time limit or preemption reaches every task;
ranks agree at a step boundary (an all-reduce of a flag, as Megatron's
DistributedSignalHandler does), save, and exit so the requeued job resumes."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR2,)) -> "StopRequest":
        # Replaces submitit's USR2 handler: it checkpoints on rank 0 only and requeues at once,
        # which would cut the other ranks off mid-step.
        for sig in signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agree(self, group=None) -> bool:
        """True on every rank of `group` if any rank got the signal. Collective: all ranks call it."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.get_backend(group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        self.requested = bool(flag.item() > 0)
        return self.requested
