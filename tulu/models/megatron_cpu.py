"""Make megatron-core 0.16.1 run on a CPU-only torch (gloo, tiny models, CI boxes).

Megatron-core assumes a CUDA device in a handful of places. On a CPU-only build of torch each of
those calls raises ("Torch not compiled with CUDA enabled"), so redirecting them to the CPU
changes no working behaviour: it turns crashes into the CPU equivalent. :func:`apply` does it,
only when ``torch.cuda.is_available()`` is false, and is idempotent. Call it once, before building
a model (``tulu.models.llama.build_gpt_model`` does). The patches:

1. ``torch.cuda.current_device`` returns ``"cpu"`` (global). Megatron passes it as ``device=``
   in ~40 places (linear layers, tensor-parallel mappings, rotary embeddings, p2p shapes, ...).
2. ``torch.cuda.synchronize`` becomes a no-op (global). Called after batched p2p in the pipeline
   schedules and by checkpointing; CPU ops are synchronous already.
3. Literal ``device="cuda"`` tensor factories (``torch.zeros(..., device="cuda")`` etc.) in the
   modules listed in ``LITERAL_CUDA_MODULES``: their module-level name ``torch`` is replaced by
   a copy of the torch module whose factories (``FACTORIES``) map a CUDA device to ``"cpu"``.
   Hit by: the pipeline schedules (token counters), ``transformer.utils.get_default_causal_mask``
   (every causal attention without an explicit mask), the optimizer's scale/found-inf tensors,
   grad clipping's norm buffers, ``utils.local_multi_tensor_l2_norm`` (the grad norm without
   Apex) and the DDP grad buffer. Nothing outside those modules changes.
4. The CUDA RNG state tracker works on the CPU generator: ``tensor_parallel.random``'s
   ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` get/set ``torch``'s default (CPU) generator
   state, and ``CudaRNGStatesTracker.add`` / ``.fork`` are replaced by versions that seed and
   swap that generator (the originals call ``torch.cuda.get_rng_state``, and ``fork`` warns
   whenever the CPU state changes inside the fork, which on CPU is every dropout call). This
   keeps Megatron's semantics: tensor-parallel regions draw from a per-TP-rank stream.
   ``model_parallel_cuda_manual_seed``'s own ``torch.cuda.manual_seed`` is queued lazily by
   torch on a CPU build and never runs: seed the CPU generator yourself (``torch.manual_seed``).
5. Gradient clipping: ``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` asserts
   ``param.grad.type() == 'torch.cuda.FloatTensor'``; it is replaced (in ``clip_grads`` and in
   ``optimizer.optimizer``, which imported it by name) by the same scaling with the assert
   relaxed to "fp32 gradient on any device". The gradient norm the optimizer clips by
   (``get_grad_norm_fp32``, as ``optimizer.optimizer`` imported it) is taken by one
   ``torch._foreach_norm`` and no all-reduce when its statistics group has one rank (TP = PP = 1,
   replicated optimizer); any other case is Megatron's function.

6. The distributed optimizer's constructor sorts parameters by ``param.type()`` against the CUDA
   type names ("torch.cuda.FloatTensor", ...) and raises on a CPU tensor:
   ``DistributedOptimizer.__init__`` runs with ``nn.Parameter.type()`` answering the CUDA twin's
   name for a CPU parameter (only while it runs; plain tensors untouched).
7. Its checkpoint gather (``DistributedOptimizer.get_parameter_state_dp_zero``, used by the
   "fully_reshardable" save) copies buffers with ``.cuda()`` unless asked for its gloo route; on
   CPU the data-parallel group is gloo already, so it takes the gloo route over that group.
   The optimizer's step itself needs nothing: gloo in torch 2.13 has ``reduce_scatter_tensor``
   and ``all_gather_into_tensor``.

Sequence parallelism needs no patch: its torch-norm refusal is a spec choice, answered by
``tulu.models.norm.RMSNorm`` in ``tulu.models.llama``'s spec.

Known not to work on CPU (not patched): DDP ``overlap_grad_reduce`` and ``overlap_param_gather``
(CUDA streams), CUDA graphs, the bf16 *replicated* optimizer (``Float16OptimizerWithFloat16Params``
has the same CUDA type check as 6; CPU runs are fp32), ``.cuda()`` calls in
``dist_checkpointing.exchange_utils`` (fully parallel load) and ``utils.check_param_hashes``.

``PATCH_TARGETS`` names every attribute patched, with the parameters the patch relies on; the
unit test ``tests/unit/test_models_cpu_patch_targets.py`` checks them against the installed
megatron-core, so that an upgrade that moves a target fails loudly instead of silently; the
multi-process tests ``tests/multiproc/test_models_*.py`` run the patched paths end to end.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

__all__ = ["apply", "is_applied", "original", "PATCH_TARGETS", "LITERAL_CUDA_MODULES", "FACTORIES"]

#: Modules that create tensors with a literal ``device="cuda"`` on the paths we use.
LITERAL_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)

#: torch factories whose ``device=`` is redirected inside ``LITERAL_CUDA_MODULES``.
FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
             "empty_like", "full_like")

#: (module, attribute, parameters the patch relies on, in order; None = not a function we wrap).
PATCH_TARGETS = (
    ("torch.cuda", "current_device", ()),
    ("torch.cuda", "synchronize", ("device",)),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state",
     ("device", "clone", "graph_safe")),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
     ("new_state", "device", "graph_safe")),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", ("self", "name", "seed")),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork", ("self", "name")),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
     ("parameters", "max_norm", "total_norm", "use_decoupled_grad")),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32",
     ("parameters", "max_norm", "total_norm", "use_decoupled_grad")),
    ("megatron.core.optimizer.optimizer", "get_grad_norm_fp32",
     ("grads_for_norm", "norm_type", "grad_stats_parallel_group")),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__", ("self",)),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
     ("self", "use_gloo_comm", "empty_data", "return_on_all_ranks")),
) + tuple((m, "torch", None) for m in LITERAL_CUDA_MODULES)

_MARK = "_tulu_cpu_patch"
_ORIGINALS: dict[tuple[str, str], object] = {}
_STATE = {"applied": False}


def original(module: str, attribute: str):
    """The object a patch replaced (or the current one if not patched): ``attribute`` may be
    dotted (``"CudaRNGStatesTracker.add"``). Lets tests check the installed megatron-core's
    signatures even after :func:`apply` ran in the same process."""
    if (module, attribute) in _ORIGINALS:
        return _ORIGINALS[(module, attribute)]
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _replace(module: str, attribute: str, new) -> None:
    """Set ``module.attribute`` (dotted: ``Class.method``) to ``new``, remembering the original."""
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise AttributeError(
            f"megatron_cpu: {module}.{attribute} is gone (megatron-core upgrade?); the CPU patch "
            "list in tulu/models/megatron_cpu.py needs updating"
        )
    _ORIGINALS.setdefault((module, attribute), getattr(owner, name))
    setattr(owner, name, new)


def is_applied() -> bool:
    """True when the CPU redirects are in place in this process."""
    return _STATE["applied"]


def apply() -> bool:
    """Install the CPU redirects if CUDA is unavailable. Returns True when they are in place."""
    if torch.cuda.is_available():
        return False
    if is_applied():
        return True
    _patch_torch_cuda()
    _patch_literal_cuda_devices()
    _patch_rng_tracker()
    _patch_grad_clipping()
    _patch_distributed_optimizer()
    _STATE["applied"] = True
    return True


# --- 1 and 2: torch.cuda.current_device / synchronize -------------------------------------------

def _current_device() -> str:
    return "cpu"


def _synchronize(device=None) -> None:  # noqa: ARG001 - same signature as torch.cuda.synchronize
    return None


def _patch_torch_cuda() -> None:
    _replace("torch.cuda", "current_device", _current_device)
    _replace("torch.cuda", "synchronize", _synchronize)


# --- 3: literal device="cuda" ------------------------------------------------------------------

def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


@functools.cache
def _torch_on_cpu() -> types.ModuleType:
    """A stand-in for the ``torch`` module: identical, except FACTORIES accept a CUDA device."""
    proxy = types.ModuleType("torch", torch.__doc__)
    proxy.__dict__.update(torch.__dict__)
    for name in FACTORIES:
        setattr(proxy, name, _on_cpu(getattr(torch, name)))
    setattr(proxy, _MARK, True)
    return proxy


def _patch_literal_cuda_devices() -> None:
    for name in LITERAL_CUDA_MODULES:
        if importlib.import_module(name).torch is torch:
            _replace(name, "torch", _torch_on_cpu())


# --- 4: the RNG state tracker on the CPU generator ----------------------------------------------

def _get_rng_state(device="cuda", clone=False, graph_safe=False):  # noqa: ARG001
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):  # noqa: ARG001
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on the CPU generator (same checks as the original)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator, without the CPU-state-changed warning."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current rng state {self._current_state_name} is not the forked state {name}"
            )
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _patch_rng_tracker() -> None:
    m = "megatron.core.tensor_parallel.random"
    _replace(m, "_get_cuda_rng_state", _get_rng_state)
    _replace(m, "_set_cuda_rng_state", _set_rng_state)
    _replace(m, "CudaRNGStatesTracker.add", _tracker_add)
    _replace(m, "CudaRNGStatesTracker.fork", _tracker_fork)


# --- 5: gradient clipping without the CUDA type assert ------------------------------------------

@torch.no_grad()
def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grad_by_total_norm_fp32 for fp32 gradients on any device (in place)."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = []
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            assert grad.dtype in (torch.float32, torch.bfloat16) if use_decoupled_grad \
                else grad.dtype == torch.float32, f"expected fp32 gradients, got {grad.dtype}"
            grads.append(to_local_if_dtensor(grad).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


@torch.no_grad()
def _grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None) -> float:
    """get_grad_norm_fp32 where the statistics group has one rank (TP = PP = 1, replicated
    optimizer): the 2-norm by one foreach call and no all-reduce (without Apex Megatron takes
    each tensor's norm in a Python loop, then all-reduces over the one-rank group: ~1 ms of each
    ~65 ms step of the CPU RL learner). Anything else is Megatron's own."""
    import torch.distributed as dist

    grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
    alone = not dist.is_initialized() or dist.get_world_size(grad_stats_parallel_group) == 1
    if float(norm_type) != 2.0 or not alone or any(type(g) is not torch.Tensor for g in grads):
        return original("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32")(
            grads_for_norm, norm_type=norm_type, grad_stats_parallel_group=grad_stats_parallel_group)
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return float(norm ** 2) ** 0.5  # Megatron's rounding: the float32 square, then the root


def _patch_grad_clipping() -> None:
    for m in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        _replace(m, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    _replace("megatron.core.optimizer.optimizer", "get_grad_norm_fp32", _grad_norm_fp32)


# --- 6 and 7: the distributed optimizer's parameter type checks and checkpoint gather ---------

_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()`` naming a CPU tensor as its CUDA twin ("torch.cuda.FloatTensor"); with
    arguments (a conversion) it is the original."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _parameters_named_as_cuda():
    """While active, ``nn.Parameter.type()`` of a CPU parameter answers with the CUDA type name
    (plain tensors are untouched). The class attribute is restored on exit."""
    had = "type" in torch.nn.Parameter.__dict__
    previous = torch.nn.Parameter.__dict__.get("type")
    torch.nn.Parameter.type = _cuda_type_name
    try:
        yield
    finally:
        if had:
            torch.nn.Parameter.type = previous
        else:
            del torch.nn.Parameter.type


def _patch_distributed_optimizer() -> None:
    """``DistributedOptimizer.__init__`` sorts parameters into fp32 / fp16-bf16 groups by
    ``param.type()`` against the CUDA type names and raises on anything else (a CPU
    ``torch.FloatTensor``). Its constructor runs with CPU parameters named as their CUDA twins;
    nothing else changes: the sharding, the reduce-scatter of gradients and the all-gather of
    parameters are plain torch.distributed calls that gloo supports (torch 2.13)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init = DistributedOptimizer.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with _parameters_named_as_cuda():
            init(self, *args, **kwargs)

    _replace("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__", __init__)

    gather = DistributedOptimizer.get_parameter_state_dp_zero

    @functools.wraps(gather)
    def get_parameter_state_dp_zero(self, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False):
        # The checkpoint gather has two routes: "gloo" (CPU buffers, the DP gloo group) and the
        # default one (``.cuda()`` copies, the DP group). On CPU the DP group is a gloo group
        # already, so the default route is the gloo route over that same group.
        gloo_group = self.data_parallel_group_gloo
        self.data_parallel_group_gloo = self.data_parallel_group
        try:
            return gather(self, use_gloo_comm=True, empty_data=empty_data,
                          return_on_all_ranks=return_on_all_ranks)
        finally:
            self.data_parallel_group_gloo = gloo_group

    _replace("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
             get_parameter_state_dp_zero)
