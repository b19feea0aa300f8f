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
Megatron's distributed optimizer is saved "fully_reshardable" (loads under another TP/PP/DP);
loading it into a freshly built one over torch's Adam needs the three repairs described at
``load_optimizer``'s helpers below (megatron-core 0.16.1, any device).

On CPU, ``dist_checkpointing`` calls ``torch.cuda.synchronize``/``current_device``: the run must
have applied the CPU redirects (``tulu.models.megatron_cpu``) first.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

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
# "mem_efficient": the save gathers each model-parallel shard's fp32 state (master, m, v) on its
# DP rank 0 over the gloo DP group, in host memory. Without it Megatron all-gathers it with NCCL
# to *every* DP rank, through GPU buffers as large as the DDP bucket: our DDP does not overlap
# the grad reduction, so one bucket holds the whole stage shard, and the save would need
# 4 B x (1 + 1/DP) x that shard's parameters of free GPU memory (~32 GB per GPU at 405B PP8),
# which the 405B presets do not have. The file format is the same sharding type and loads the
# same way (Megatron calls the two interchangeable); tulu/plan/memory.py sizes what remains.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}


def save_optimizer(optimizer: Any, model: ModelLike, folder: Path) -> None:
    model_sd, _ = model_sharded_state(model)
    with collectives.single_process_group():
        _dc().save(optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=dict(OPTIMIZER_METADATA)),
                   str(folder))


def load_optimizer(optimizer: Any, model: ModelLike, folder: Path) -> None:
    model_sd, _ = model_sharded_state(model)
    adams = _torch_adam_distributed_optimizers(optimizer)
    for opt in adams:
        _init_adam_state_at_step_zero(opt)
    with collectives.single_process_group():
        template = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=dict(OPTIMIZER_METADATA))
        loaded = _dc().load(template, str(folder))
        with contextlib.ExitStack() as stack:
            for opt in adams:
                stack.enter_context(_step_kept_when_loading_moments(opt))
            optimizer.load_state_dict(loaded)
    for opt in adams:
        _unshare_adam_steps(opt)


# --- Megatron's distributed optimizer over torch's Adam ------------------------------------------
# Without Apex or Transformer Engine (our GPU image has neither, and CPU never does), Megatron's
# DistributedOptimizer wraps torch.optim.Adam/AdamW, which keeps Adam's step per parameter in its
# state; megatron-core 0.16.1 handles that case in two places badly, on any device:
# - ``sharded_state_dict(is_loading=True)`` starts with ``state_dict()``, which asserts that all
#   parameters share one step: a freshly built optimizer has no state at all, so the assert fails
#   (``assert len(steps) == 1``) before anything is read;
# - ``load_state_dict`` sets the step from the checkpoint, then copies each parameter's
#   moments from the "fully_reshardable" state with ``_set_main_param_and_optimizer_states``,
#   which expects a value for every key of the parameter's state, "step" included, while the
#   checkpoint (rightly) carries the step once, not per parameter: ``KeyError: 'step'``;
# - ``load_state_dict`` gives every parameter the *same* step tensor, and torch's Adam adds 1 to
#   each parameter's step in place: the shared step then advances by the number of parameters per
#   iteration and every later bias correction is wrong.
# Fixed around Megatron, not inside it: an Adam state at step 0 (zero moments: what a first step
# starts from; parameters untouched, unlike a dummy optimizer step with weight decay) before the
# template is built, every loaded value then overwrites it; while the moments are copied the
# step already loaded is kept; after loading each parameter gets its own step tensor.


def _megatron_parts(optimizer: Any) -> list[Any]:
    """The optimizers inside ``optimizer``: Megatron's ``ChainedOptimizer`` (and anything else
    made of several, e.g. the RLVR policy + value pair) lists them in ``chained_optimizers``."""
    parts = getattr(optimizer, "chained_optimizers", None)
    if parts is None:
        return [optimizer]
    return [leaf for part in parts for leaf in _megatron_parts(part)]


def _torch_adam_distributed_optimizers(optimizer: Any) -> list[Any]:
    try:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    except ImportError:
        return []
    return [opt for opt in _megatron_parts(optimizer)
            if isinstance(opt, DistributedOptimizer)
            and isinstance(getattr(opt, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))]


def _init_adam_state_at_step_zero(opt: Any) -> None:
    inner = opt.optimizer
    if len(inner.state):
        return
    opt.init_state_fn(inner, opt.config)  # Megatron's own: zero exp_avg / exp_avg_sq
    for group in inner.param_groups:
        for p in group["params"]:
            inner.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)


@contextlib.contextmanager
def _step_kept_when_loading_moments(opt: Any) -> Iterator[None]:
    """While active, ``opt._set_main_param_and_optimizer_states`` leaves Adam's step as loaded
    (it is handed the parameter's own step, a copy onto itself) instead of raising KeyError."""
    set_states = opt._set_main_param_and_optimizer_states

    def set_states_keeping_step(model_param, tensors):
        if "step" not in tensors:
            group, order = opt.model_param_group_index_map[model_param]
            step = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        set_states(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states_keeping_step
    try:
        yield
    finally:
        del opt._set_main_param_and_optimizer_states  # the class's method again


def _unshare_adam_steps(opt: Any) -> None:
    for state in opt.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
