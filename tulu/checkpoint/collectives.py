"""The few collectives a checkpoint needs, written so they also work without torch.distributed.

Every helper degrades to the single-process answer when no default process group exists, so
:class:`~tulu.checkpoint.manager.CheckpointManager` runs unchanged in a notebook, a unit test
or a 256-rank job.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, Iterator

import torch.distributed as dist

__all__ = [
    "all_gather_object", "barrier", "broadcast_object", "is_distributed", "rank",
    "single_process_group", "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the object itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A throw-away 1-rank gloo world for the duration of the block, if none exists.

    Megatron's ``dist_checkpointing`` asks ``torch.distributed`` for the rank even in a single
    process; this lets a plain script save and load the same format a distributed job does.
    An existing default group is used as is and left alone.
    """
    if is_distributed():
        yield
        return
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(minutes=5)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
