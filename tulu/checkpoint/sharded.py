"""Model and optimizer state through Megatron ``dist_checkpointing`` (reshardable on load).

What a caller may hand over as "the model":

- a Megatron module (anything with ``sharded_state_dict()``): its sharded state dict is saved,
  and on load the result goes back through ``load_state_dict``;
- a sharded state dict (values are ``ShardedTensor``/``ShardedObject``/factories), or a
  zero-argument callable returning one: saved as is; on load it is the template and the loaded
  dict is handed back;
- a plain ``torch.nn.Module`` or ``{name: tensor}`` dict: each tensor becomes one unsharded
  ``ShardedTensor`` (rank 0 holds the main replica), so single-process and plain-PyTorch runs
  write the same on-disk format as a Megatron run.

An optimizer with ``sharded_state_dict(model_sd, is_loading=...)`` (Megatron's) is saved the same
way and reshards too; a plain ``torch.optim`` optimizer is saved per rank (see the manager).

On CPU, ``dist_checkpointing`` calls ``torch.cuda.synchronize``/``current_device``: the run must
have applied the CPU redirects (``tulu.models.megatron_cpu``) first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch

from . import collectives

__all__ = ["ModelLike", "has_sharded_state", "load_model", "load_optimizer", "save_model",
           "save_optimizer"]

ModelLike = Union[torch.nn.Module, Mapping[str, Any], Callable[[], Mapping[str, Any]]]


def _dc():
    from megatron.core import dist_checkpointing
    _local_results_queue()
    return dist_checkpointing


def _local_results_queue() -> None:
    """Give Megatron's file writer an in-process queue instead of its spawn ``Manager().Queue()``.

    The Manager starts a fresh interpreter (it re-imports the launcher's ``__main__``) on the
    first save of every process: 3.5 s on an idle 2-core machine, 5+ s loaded, paid by every
    job, every restart and every multi-process test. We save synchronously: ``save`` runs the
    writer proxy in this process; it forks the per-bucket writers, gathers their results and puts
    them on this queue, and ``retrieve_write_results`` reads them back here with ``get_nowait``
    (an mp.Queue's feeder thread would race that). Megatron's async-save mode, which runs the
    proxy in another process and does need the Manager, is not used."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", "missing") is None:
        import queue

        fa._results_queue = queue.Queue()


def has_sharded_state(obj: Any) -> bool:
    return callable(getattr(obj, "sharded_state_dict", None))


def _is_sharded_dict(sd: Mapping[str, Any]) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    def walk(v: Any) -> bool:
        if isinstance(v, (ShardedBase, ShardedTensorFactory)):
            return True
        if isinstance(v, Mapping):
            return any(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return any(walk(x) for x in v)
        return False

    return walk(sd)


def _wrap_plain(sd: Mapping[str, Any]) -> dict[str, Any]:
    from megatron.core.dist_checkpointing import ShardedTensor

    replica = collectives.rank()  # rank 0 writes; every other rank holds a replica
    return {k: ShardedTensor.from_rank_offsets(k, v.detach(), replica_id=replica)
            if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def model_sharded_state(model: ModelLike) -> tuple[dict[str, Any], bool]:
    """``(sharded state dict, plain)``; ``plain`` means it was built from plain tensors."""
    if has_sharded_state(model):
        return model.sharded_state_dict(), False
    if isinstance(model, torch.nn.Module):
        return _wrap_plain(model.state_dict()), True
    sd = model() if callable(model) and not isinstance(model, Mapping) else model
    if _is_sharded_dict(sd):
        return dict(sd), False
    return _wrap_plain(sd), True


def save_model(model: ModelLike, folder: Path) -> None:
    """Collective: every rank calls it with its own shards; ``folder`` must exist and be empty."""
    sd, _ = model_sharded_state(model)
    with collectives.single_process_group():
        _dc().save(sd, str(folder))


def load_model(model: ModelLike, folder: Path) -> dict[str, Any] | None:
    """Load into ``model`` (a module: in place, returns None) or return the loaded dict."""
    template, _ = model_sharded_state(model)
    with collectives.single_process_group():
        loaded = _dc().load(template, str(folder))
    if isinstance(model, torch.nn.Module):
        model.load_state_dict(loaded)
        return None
    return loaded


# Megatron 0.16's default for its distributed optimizer ("fully_sharded_model_space") fails to
# save ("ShardedTensor.flattened_range is not supported", seen on an H100); "fully_reshardable"
# keeps the checkpoint reshardable across TP/PP/DP. Ignored by the replicated optimizer.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def save_optimizer(optimizer: Any, model: ModelLike, folder: Path) -> None:
    model_sd, _ = model_sharded_state(model)
    with collectives.single_process_group():
        _dc().save(optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=dict(OPTIMIZER_METADATA)),
                   str(folder))


def load_optimizer(optimizer: Any, model: ModelLike, folder: Path) -> None:
    model_sd, _ = model_sharded_state(model)
    with collectives.single_process_group():
        template = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=dict(OPTIMIZER_METADATA))
        optimizer.load_state_dict(_dc().load(template, str(folder)))
