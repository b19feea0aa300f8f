"""Graceful stop: the warning signal before a time limit or preemption reaches every task;
ranks agree at a step boundary (an all-reduce of a flag, as Megatron's
DistributedSignalHandler does), save, and exit so the requeued job resumes.

Slurm sends the warning to every process of the job step, the task's own children included:
Megatron's checkpoint writers, the verifier workers, vLLM's helpers. For them the default
action of USR2 is to die, which killed a checkpoint save mid-write on the local cluster. So
the signal is *blocked* in the task (children inherit the mask, across fork and exec) and the
task polls for it at step boundaries; a handler stays installed for threads that were started
before the mask was set.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequest:
    def __init__(self) -> None:
        self._requested = False
        self.signal_name: str | None = None
        self._signals: tuple[int, ...] = ()

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR2,)) -> "StopRequest":
        # Replaces submitit's USR2 handler too: it checkpoints on rank 0 only and requeues at
        # once, which would cut the other ranks off mid-step.
        self._signals = signals
        for sig in signals:
            signal.signal(sig, self._on_signal)
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        return self

    def _on_signal(self, signum, frame) -> None:
        self._requested = True
        self.signal_name = signal.Signals(signum).name

    def _poll(self) -> None:
        pending = signal.sigpending() & set(self._signals)
        for sig in pending:
            signal.sigtimedwait([sig], 0)  # consume it
            self._on_signal(sig, None)

    @property
    def requested(self) -> bool:
        if not self._requested and self._signals:
            self._poll()
        return self._requested

    @requested.setter
    def requested(self, value: bool) -> None:
        self._requested = value

    def agree(self, group=None) -> bool:
        """True on every rank of `group` if any rank got the signal. Collective: all ranks call it."""
        if not dist.is_initialized() or dist.get_world_size(group) == 1:  # nobody to agree with
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.get_backend(group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        self._requested = bool(flag.item() > 0)
        return self._requested
