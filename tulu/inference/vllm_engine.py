"""The vLLM inference engine: one engine per inference role world, kept in this process.

With ``tp * pp > 1`` the engine runs SPMD, torchrun-style: every rank of the inference role's
own world (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, set by the caller for that world
only, never shared with the training role) builds the same engine with
``distributed_executor_backend="external_launcher"``, calls ``generate`` with the same prompts and
settings, and gets the same completions. vLLM then owns the process's default process group;
talk to the trainer through the bridge group, not through ``torch.distributed``'s world.

Weights are reloaded in place, without a restart: the checked stream (streamed, never held
whole: ``tulu.inference.engine.CheckedWeights``) goes to every worker's ``reload_weights`` (vLLM's layerwise reload, which re-runs the CPU linear repacking; a plain
``model.load_weights`` after start corrupts repacked layers on CPU), then the prefix cache is
reset so no prompt reuses KV computed with the old weights.

CPU settings made here when the caller has not set them (docs/design.md §7):
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine core in-process: 3 s start instead of 20 s, and
``reload_weights`` gets the tensors without pickling), ``VLLM_CPU_OMP_THREADS_BIND`` with one core
range per local rank when ``tp * pp > 1``, ``gpu_memory_utilization=0.2`` (vLLM reads the NUMA
node's memory on CPU), ``enforce_eager=True``, ``enable_chunked_prefill=False`` (seeded sampling
crashes on CPU when a prompt is split, see below), and a valid per-world name for the CPU
shared-memory communicator that vLLM's AVX-512 kernels use for TP/PP (``tulu/inference/cpu_shm.py``:
derived from ``env://`` it holds a ``/``, which ``shm_open`` refuses, and two engines on one host
would share it).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from tulu.inference.cpu_shm import prefix_vllm_cpu_shm_names, release_vllm_cpu_shm
from tulu.inference.engine import (
    Completion,
    InferenceEngine,
    SamplingSettings,
    CheckedWeights,
    read_weight_shapes,
)

__all__ = ["VllmEngine", "cpu_threads_bind", "prompt_seed"]

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cpu_threads_bind(local_world_size: int, cpus: list[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each local rank its own slice of this process's cores.

    ``cpus`` defaults to the cores this process may run on. With fewer cores than ranks, ranks
    share cores round-robin (slow but correct: this is what 2-core test machines get).
    """
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if local_world_size <= len(cpus):
        per = len(cpus) // local_world_size
        slices = [cpus[r * per:(r + 1) * per] for r in range(local_world_size)]
    else:
        slices = [[cpus[r % len(cpus)]] for r in range(local_world_size)]
    return "|".join(",".join(str(c) for c in s) for s in slices)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The vLLM request seed of ``prompts[prompt_index]`` (a fixed mix; below 2**31 - n)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 2**20)


def _allocate_pipeline_buffers(worker) -> bool:
    """Give a later pipeline stage its buffer for the previous stage's hidden states.

    vLLM 0.32 allocates it in its dummy warm-up run, which the CPU worker skips in eager mode;
    the first ``generate`` of a PP>1 engine then fails on every rank after the first stage
    (``assert self.intermediate_tensors is not None``). Runs on each worker (collective_rpc)."""
    from vllm.distributed.parallel_state import get_pp_group

    runner = worker.model_runner
    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return False
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
    return True


class VllmEngine(InferenceEngine):
    """``vllm.LLM`` behind :class:`InferenceEngine`. See the module docs for the parallel recipe."""

    def __init__(self, model_dir: str | Path, *, tp: int = 1, pp: int = 1,
                 gpu_memory_utilization: float | None = None, max_model_len: int = 4096,
                 seed: int = 0, dtype: str = "auto", enforce_eager: bool | None = None,
                 **llm_kwargs) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.model_dir = str(model_dir)
        self.world_size = tp * pp
        backend = None
        if self.world_size > 1:
            missing = [k for k in _DIST_ENV if k not in os.environ]
            if missing:
                raise RuntimeError(
                    f"vLLM engine with tp={tp}, pp={pp} runs one process per rank "
                    f"(external_launcher) but {', '.join(missing)} is not set; set the inference "
                    "role's own RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT first")
            if int(os.environ["WORLD_SIZE"]) != self.world_size:
                raise RuntimeError(
                    f"vLLM engine with tp={tp} x pp={pp} needs an inference world of "
                    f"{self.world_size} ranks, but WORLD_SIZE={os.environ['WORLD_SIZE']}: the "
                    "inference role must have its own world (its own MASTER_PORT), not the job's")
            backend = "external_launcher"

        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            if gpu_memory_utilization is None:
                gpu_memory_utilization = 0.2
            if enforce_eager is None:
                enforce_eager = True
            # vLLM 0.32 on CPU: when chunked prefill splits a prompt, a seeded request's generator
            # is rewound with Generator.set_offset, which CPU generators do not have
            # ("RuntimeError: CPU Generator does not use offset"); seeded batches of more prompt
            # tokens than max_num_batched_tokens crash. Whole-prompt prefill avoids it.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            if backend is not None:
                local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(local))
                prefix_vllm_cpu_shm_names(os.environ["MASTER_PORT"])
        self.llm = LLM(
            model=self.model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
            distributed_executor_backend=backend,
            gpu_memory_utilization=0.9 if gpu_memory_utilization is None else gpu_memory_utilization,
            max_model_len=max_model_len, seed=seed, dtype=dtype,
            enforce_eager=bool(enforce_eager),
            logprobs_mode="processed_logprobs",      # after temperature and top-p: see engine.py
            **llm_kwargs,
        )
        if on_cpu and pp > 1:
            self.llm.collective_rpc(_allocate_pipeline_buffers)
        self._shapes = read_weight_shapes(self.model_dir)
        config = json.loads((Path(self.model_dir) / "config.json").read_text())
        self.pp = pp
        self._num_layers = int(config.get("num_hidden_layers", 0))
        self._tied = bool(config.get("tie_word_embeddings"))
        self._optional = (("lm_head.weight",) if config.get("tie_word_embeddings")
                          and "lm_head.weight" not in self._shapes else ())
        self.prefix_cache_resets = 0
        self.weight_updates = 0

    def generate(self, prompts: list[list[int]], n: int = 1,
                 sampling: SamplingSettings | None = None) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = self._start_generate(prompts, n, sampling)
        # One seed per prompt: vLLM's CPU sampler draws its noise from (seed, position), so one
        # shared seed would give every prompt's k-th sample the same noise. vLLM gives the j-th
        # of n samples seed + j.
        params = [SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, logprobs=0,
            seed=None if sampling.seed is None else prompt_seed(sampling.seed, i),
            # Explicit stop ids replace the model's eos (the engine contract), they do not add to it.
            stop_token_ids=list(sampling.stop_token_ids or ()),
            ignore_eos=sampling.stop_token_ids is not None,
        ) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    params, use_tqdm=False)
        completions = []
        for i, out in enumerate(outputs):
            for j, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                token_ids = list(c.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(token_ids, c.logprobs or [])]
                if len(logprobs) != len(token_ids):
                    raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for "
                                       f"{len(token_ids)} tokens (prompt {i}, sample {j})")
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished prompt {i} sample {j} with "
                                       f"{c.finish_reason!r} ({c.stop_reason!r})")
                completions.append(Completion(
                    prompt_index=i, sample_index=j, token_ids=token_ids, logprobs=logprobs,
                    finish_reason=c.finish_reason, text=c.text))
        return completions

    def held_weights(self):
        """This rank's pipeline stage (vLLM's own layer split, ``get_pp_indices``): its layers,
        the embedding on the first stage (and on the last when tied) and the head on the last.
        None without pipeline parallelism: every TP rank takes full tensors and slices them."""
        if self.pp == 1:
            return None
        from vllm.distributed.parallel_state import get_pp_group
        from vllm.distributed.utils import get_pp_indices

        from tulu.dist.weight_sync import HeldWeights

        group = get_pp_group()
        first, end = get_pp_indices(self._num_layers, group.rank_in_group, self.pp)
        return HeldWeights(first_layer=first, end_layer=end,
                           embedding=group.is_first_rank or (self._tied and group.is_last_rank),
                           head=group.is_last_rank)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        # The checked stream is vLLM's weights iterator: each worker loads it layer by layer as
        # buckets arrive. A problem found mid-stream ends the iterator early (vLLM finalises the
        # layers it got; a partly loaded fused layer holds garbage) and is raised after the
        # reload, with weights_incomplete set: generate refuses until a complete update.
        checked = CheckedWeights(named_tensors, self._shapes, optional=self._optional,
                                 where=f"vLLM engine ({self.model_dir})")

        def load(weights) -> None:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight update "
                                   "(requests still running?); completions could reuse stale KV")
            self.prefix_cache_resets += 1

        loaded = self._load_streamed(checked, load)
        self.weight_updates += 1
        return loaded

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        release_vllm_cpu_shm()
