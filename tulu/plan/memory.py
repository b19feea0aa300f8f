"""Per-GPU memory of a layout: plain arithmetic, so a 32-node plan is checked before any GPU is spent.

Bytes per parameter in mixed precision with Adam: 2 (bf16 weights) + 2 or 4 (bf16/fp32 grads)
+ 12 (fp32 master copy, Adam m and v; sharded over DP by the distributed optimizer).
Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", Table 2 (bytes per layer per micro-batch, 16-bit activations):
  no recompute, TP:            s*b*h*(10 + 24/t + 5*a*s/(h*t))
  no recompute, TP+SP:         s*b*h/t*(34 + 5*a*s/h)
  selective recompute (+SP):   s*b*h*(10 + 24/t)   (34*s*b*h/t with SP)
  full recompute:              2*s*b*h per layer input (/t with SP) + one layer's working set
Under 1F1B the first stage holds `pp` micro-batches in flight. The formula is for a GPT block;
SwiGLU and GQA shift it by tens of percent, which the headroom absorbs.

A checkpoint save (tulu.checkpoint.sharded, megatron-core 0.16.1) is counted twice: its GPU
transient joins each training GPU's breakdown, and its host-RAM peak joins the per-node host
breakdown (:func:`node_host_memory`), next to the data, the process runtime and vLLM's loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tulu.config.shapes import ModelShape

GB = 1e9
OPTIMIZER_STATE_BYTES = 12  # per parameter: fp32 master copy, Adam m and v
# CUDA context, NCCL buffers and library workspaces. Measured order of magnitude on H100s with
# NCCL 2.2x: 3-6 GB; we take the high end so a layout that "fits" really does.
RUNTIME_OVERHEAD_GB = 5.0
# Share of the card the caching allocator can actually use before fragmentation bites.
USABLE_FRACTION = 0.9


@dataclass(frozen=True, slots=True)
class TrainingMemoryInputs:
    shape: ModelShape
    tp: int
    pp: int
    dp: int
    layers_per_stage: tuple[int, ...]
    seq_len: int
    micro_batch_size: int
    weight_bytes: int = 2
    grad_bytes: int = 4
    distributed_optimizer: bool = True
    sequence_parallel: bool = False
    recompute: str = "none"
    reference_model: bool = False
    value_shape: ModelShape | None = None
    sequences_per_micro_batch: int = 1  # DPO puts chosen and rejected side by side


@dataclass(slots=True)
class MemoryRow:
    name: str
    gb: float
    alternative: str = ""  # e.g. the same row without the distributed optimizer


@dataclass(slots=True)
class MemoryBreakdown:
    title: str
    rows: list[MemoryRow] = field(default_factory=list)
    capacity_gb: float = 80.0
    usable_fraction: float = USABLE_FRACTION

    @property
    def total_gb(self) -> float:
        return sum(r.gb for r in self.rows)

    @property
    def usable_gb(self) -> float:
        return self.capacity_gb * self.usable_fraction

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.usable_gb

    def table(self) -> str:
        width = max(len(r.name) for r in self.rows) + 2
        lines = [self.title]
        for r in self.rows:
            alt = f"   ({r.alternative})" if r.alternative else ""
            lines.append(f"  {r.name:<{width}}{r.gb:8.1f} GB{alt}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<{width}}{self.total_gb:8.1f} GB of {self.usable_gb:.1f} GB usable "
                     f"({self.capacity_gb:.0f} GB x {self.usable_fraction}): {verdict}")
        return "\n".join(lines)


def stage_params(shape: ModelShape, layers: tuple[int, ...], stage: int) -> int:
    n = layers[stage] * shape.params_per_layer
    if stage == 0:
        n += shape.embedding_params
    if stage == len(layers) - 1:
        n += shape.hidden_size + (0 if shape.tied_embeddings else shape.embedding_params)
    return n


def activation_bytes_per_layer(shape: ModelShape, s: int, b: int, t: int, sp: bool, recompute: str) -> float:
    h, a = shape.hidden_size, shape.num_heads
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    if recompute == "selective":
        return 34 * sbh / t if sp else sbh * (10 + 24 / t)
    if sp:
        return sbh / t * (34 + 5 * a * s / h)
    return sbh * (10 + 24 / t + 5 * a * s / (h * t))


def training_stage_memory(m: TrainingMemoryInputs, stage: int, capacity_gb: float) -> MemoryBreakdown:
    shards = m.tp
    p_gpu = stage_params(m.shape, m.layers_per_stage, stage) / shards
    opt_full = p_gpu * OPTIMIZER_STATE_BYTES
    opt = opt_full / m.dp if m.distributed_optimizer else opt_full
    out = MemoryBreakdown(f"training GPU, pipeline stage {stage} ({m.layers_per_stage[stage]} layers)",
                          capacity_gb=capacity_gb)
    out.rows.append(MemoryRow("policy weights", p_gpu * m.weight_bytes / GB))
    out.rows.append(MemoryRow(f"gradients ({'bf16' if m.grad_bytes == 2 else 'fp32'})", p_gpu * m.grad_bytes / GB,
                              f"{'fp32' if m.grad_bytes == 2 else 'bf16'}: {p_gpu * (6 - m.grad_bytes) / GB:.1f} GB"))
    alt = (f"without distributed optimizer: {opt_full / GB:.1f} GB" if m.distributed_optimizer
           else f"with distributed optimizer: {opt_full / m.dp / GB:.1f} GB")
    out.rows.append(MemoryRow("optimizer state (fp32 master, m, v)", opt / GB, alt))
    if m.reference_model:
        out.rows.append(MemoryRow("frozen reference model", p_gpu * m.weight_bytes / GB))
    if m.value_shape is not None:
        # The value model's stages follow its own layer count; count an even share per stage.
        v_gpu = m.value_shape.num_params / m.pp / shards
        v_opt = v_gpu * OPTIMIZER_STATE_BYTES / (m.dp if m.distributed_optimizer else 1)
        out.rows.append(MemoryRow(f"value model ({m.value_shape.name}: weights, grads, optimizer)",
                                  (v_gpu * (m.weight_bytes + m.grad_bytes) + v_opt) / GB))
    in_flight = m.pp - stage  # 1F1B warm-up depth on this stage
    s, b = m.seq_len, m.micro_batch_size * m.sequences_per_micro_batch
    per_layer = activation_bytes_per_layer(m.shape, s, b, m.tp, m.sequence_parallel, m.recompute)
    act = per_layer * m.layers_per_stage[stage] * in_flight
    if m.recompute == "full":  # one layer is rebuilt in full during its backward
        act += activation_bytes_per_layer(m.shape, s, b, m.tp, m.sequence_parallel, "none")
    no_recompute = activation_bytes_per_layer(m.shape, s, b, m.tp, m.sequence_parallel, "none")
    alt_act = no_recompute * m.layers_per_stage[stage] * in_flight
    out.rows.append(MemoryRow(
        f"activations ({m.recompute} recompute, {in_flight} micro-batches in flight)", act / GB,
        "" if m.recompute == "none" else f"without recomputation: {alt_act / GB:.1f} GB"))
    if stage == m.pp - 1:
        logits = s * b * m.shape.vocab_size / m.tp * 4 * 2  # fp32 logits and their gradient
        out.rows.append(MemoryRow("logits (fp32, with gradient)", logits / GB))
    out.rows.append(save_gpu_row(optimizer_shard_params(m, stage), m.dp, m.distributed_optimizer))
    out.rows.append(MemoryRow("CUDA context, NCCL buffers", RUNTIME_OVERHEAD_GB))
    return out


def training_memory(m: TrainingMemoryInputs, capacity_gb: float) -> MemoryBreakdown:
    """The fullest pipeline stage: the one that decides whether the layout fits."""
    stages = [training_stage_memory(m, st, capacity_gb) for st in range(m.pp)]
    return max(stages, key=lambda b: b.total_gb)


@dataclass(frozen=True, slots=True)
class InferenceMemory:
    breakdown: MemoryBreakdown
    kv_cache_gb: float
    kv_tokens: int  # tokens of KV cache one engine holds


# Outside vLLM's gpu_memory_utilization budget on an engine GPU: the CUDA context and NCCL's
# communicator buffers.
ENGINE_RESERVE_GB = 1.0


def weight_sync_buffers_gb(bucket_mb: float, streams: int, stages: int, largest_tensor_bytes: int) -> float:
    """An engine rank's receive buffers during a weight sync (`tulu.dist.weight_sync`): two or
    three of a bucket's size per training stage it receives at once (``min(streams, stages)``),
    and one of the largest tensor where that is larger than a bucket (a full embedding: vLLM
    slices it)."""
    bucket = bucket_mb * 2**20
    return (min(streams, stages) * 3 * bucket + max(0.0, largest_tensor_bytes - bucket)) / GB


def inference_memory(shape: ModelShape, tp: int, pp: int, capacity_gb: float, utilization: float,
                     weight_bytes: int = 2, sync_buffers_gb: float = 0.0) -> InferenceMemory:
    """An engine GPU: vLLM's budget (``utilization`` of the GPU) and, beside it, the weight sync's
    receive buffers and :data:`ENGINE_RESERVE_GB`; ``breakdown.fits`` says whether they all fit."""
    shards = tp * pp
    weights = shape.num_params * weight_bytes / shards / GB
    runtime = 2.0  # vLLM activations, sampler and CUDA graphs at default settings
    budget = capacity_gb * utilization
    kv = budget - weights - runtime
    b = MemoryBreakdown(f"inference GPU (vLLM, TP{tp} x PP{pp}, gpu_memory_utilization {utilization})",
                        capacity_gb=capacity_gb, usable_fraction=round(1 - ENGINE_RESERVE_GB / capacity_gb, 4))
    b.rows.append(MemoryRow("weights (bf16)", weights))
    b.rows.append(MemoryRow("vLLM activations, sampler, CUDA graphs", runtime))
    b.rows.append(MemoryRow("KV cache", max(kv, 0.0), f"{budget:.1f} GB budget minus the rest"))
    if sync_buffers_gb:
        b.rows.append(MemoryRow("weight-sync receive buffers", sync_buffers_gb,
                                "outside vLLM's budget; rlvr.weight_sync_bucket_mb, weight_sync_streams"))
    per_token = shape.kv_bytes_per_token(weight_bytes) / shards
    tokens = int(max(kv, 0.0) * GB / per_token) if per_token else 0
    return InferenceMemory(b, kv, tokens)


# --- Checkpoint save: GPU transient and host-RAM peak -----------------------------------------
# The save path is tulu.checkpoint.sharded: Megatron's distributed optimizer saved
# "fully_reshardable" with "distrib_optim_fully_reshardable_mem_efficient" (OPTIMIZER_METADATA),
# read in megatron-core 0.16.1 (optimizer/distrib_optimizer.py, get_parameter_state_dp_zero with
# use_gloo_comm=True; dist_checkpointing/strategies/filesystem_async.py). With p = the parameters
# of this rank's grad buffer, i.e. of its model-parallel shard (our DDP does not overlap the grad
# reduction, tulu.train.model.ddp_config, so Megatron makes one bucket of the whole buffer):
#  - every DP rank copies its slice of (fp32 master, m, v) into host buffers: 12 B x p / DP;
#  - DP rank 0 allocates the whole shard's state in host RAM (12 B x p) and, key by key, gathers
#    the DP slices over the gloo DP group (4 B x p) and concatenates them (4 B x p more);
#  - the state is then cut into per-parameter views, and the file writer clones every CPU view
#    before it writes (_clone_if_needed): 12 B x p more, held with the 12 B x p until written.
#  DP rank 0's peak: max(12p + 12p/DP + 8p, 24p); other DP ranks: 12p/DP. A load builds the
#  12 B x p buffers on every rank and reads into them (below DP rank 0's save). The model's
#  weights are staged to host before (2 B x p, freed when the model save returns). PPO saves
#  policy and value in one call, so p counts both. Nodes hold whole TP groups (TP8 on 8 GPUs),
#  so a node of DP rank 0 holds the peak on all its ranks: the plan counts that node.
# On the GPU the gloo path copies existing tensors to host and allocates nothing; what remains is
# the save plans and sharding metadata that torch.distributed.checkpoint and Megatron's validation
# gather as pickled byte tensors over NCCL (tens of MB at 405B): SAVE_GPU_GB covers it. Megatron's
# default (mem_efficient off) all-gathers each key with NCCL into GPU buffers of the whole bucket
# on every DP rank: 4 B x p x (1 + 1/DP) of free GPU memory, shown as the row's alternative.
# A replicated optimizer's save stages its GPU state to host on DP rank 0: 12 B x p.
SAVE_GPU_GB = 0.5


def optimizer_shard_params(m: TrainingMemoryInputs, stage: int) -> float:
    """Parameters whose optimizer state one rank of `stage` saves: its policy shard, plus its
    share of PPO's value model (the plan's even share per stage)."""
    p = stage_params(m.shape, m.layers_per_stage, stage) / m.tp
    if m.value_shape is not None:
        p += m.value_shape.num_params / m.pp / m.tp
    return p


def save_gpu_row(params: float, dp: int, distributed_optimizer: bool) -> MemoryRow:
    if not distributed_optimizer:
        return MemoryRow("checkpoint save peak (state staged to host RAM)", SAVE_GPU_GB)
    nccl = 4 * params * (1 + 1 / dp) / GB
    return MemoryRow("checkpoint save peak (optimizer state gathered in host RAM)", SAVE_GPU_GB,
                     f"Megatron's default NCCL gather: {nccl:.1f} GB")


def save_host_bytes(params: float, dp: int, distributed_optimizer: bool) -> float:
    """Host-RAM peak of the training rank that writes its shard's optimizer state (DP rank 0)."""
    state = OPTIMIZER_STATE_BYTES * params
    if not distributed_optimizer:
        return state
    return max(state + state / dp + 8 * params, 2 * state)


# --- Host RAM per node --------------------------------------------------------------------------
# Per task, whatever its role (assumed, not measured here): the Python process with PyTorch (and
# Megatron or vLLM) imported, the CUDA driver's and libraries' host mappings (cuBLAS, cuDNN,
# NCCL) and NCCL's pinned proxy buffers: 2-4 GB of resident memory per CUDA process is the usual
# order; we take 4.
PROCESS_HOST_GB = 4.0
# Per training task: the tokenizer and the tokenized dataset. Tulu 3's SFT mixture is 939k
# conversations; held in memory at ~1k tokens each as int32 it is ~3.8 GB (an Arrow cache is
# memory-mapped and costs less).
DATA_HOST_GB = 4.0
# Per vLLM task: vLLM's CPU swap space for preempted sequences, `swap_space` (GiB per GPU), which
# we leave at vLLM's default of 4.
VLLM_SWAP_GB = 4 * 2**30 / GB
# Host RAM the OS, Slurm's daemons and the file-system client keep for themselves.
HOST_USABLE_FRACTION = 0.9


def training_host_rows(m: TrainingMemoryInputs, dp_rank0: int, others: int) -> list[MemoryRow]:
    """Host RAM of a node's training tasks at their peak: `dp_rank0` tasks of DP rank 0 (they
    gather and write) and `others` of other DP ranks, in a save or in a load, whichever is larger;
    each task counted with the largest shard of any stage."""
    params = max(optimizer_shard_params(m, st) for st in range(m.pp))
    state = OPTIMIZER_STATE_BYTES * params
    own = state / m.dp if m.distributed_optimizer else 0.0
    writer = save_host_bytes(params, m.dp, m.distributed_optimizer)   # each DP-rank-0 task
    save = dp_rank0 * writer + others * own
    load = (dp_rank0 + others) * state
    n = dp_rank0 + others
    if save >= load:
        how = ("gathered over gloo, then cloned by the writer" if m.distributed_optimizer else "staged to host")
        rows = [MemoryRow(f"training {dp_rank0} x checkpoint save peak on DP rank 0 ({state / GB:.1f} GB of "
                          f"fp32 state {how})", dp_rank0 * writer / GB, f"{writer / GB:.1f} GB each")]
        if others and own:
            rows.append(MemoryRow(f"training {others} x checkpoint save, other DP ranks (own 1/{m.dp} slice)",
                                  others * own / GB, f"{own / GB:.1f} GB each"))
    else:
        rows = [MemoryRow(f"training {n} x checkpoint load peak (every rank reads its shard's "
                          f"{state / GB:.1f} GB of fp32 state)", load / GB, f"{state / GB:.1f} GB each")]
    return rows + [MemoryRow(f"training {n} x tokenizer and tokenized dataset", n * DATA_HOST_GB,
                             f"{DATA_HOST_GB:.1f} GB each"),
                   MemoryRow(f"training {n} x PyTorch, CUDA context, NCCL host buffers", n * PROCESS_HOST_GB,
                             f"{PROCESS_HOST_GB:.1f} GB each")]


def inference_host_rows(shape: ModelShape, tp: int, pp: int, engine: str, tasks: int,
                        weight_bytes: int = 2) -> list[MemoryRow]:
    """Host RAM of a node's inference tasks: each one's weight shard read through host memory while
    loading (safetensors pages; the node's tasks read disjoint shards), vLLM's swap space, the runtime."""
    each = [(f"weight loading ({engine} reads its 1/{tp * pp} shard through host RAM)",
             shape.num_params * weight_bytes / (tp * pp) / GB)]
    if engine == "vllm":
        each.append(("vLLM swap space (swap_space default, 4 GiB)", VLLM_SWAP_GB))
    each.append(("PyTorch, CUDA context, NCCL host buffers", PROCESS_HOST_GB))
    return [MemoryRow(f"inference {tasks} x {name}", tasks * gb, f"{gb:.1f} GB each") for name, gb in each]


def node_host_memory(nodes: list[list[MemoryRow]], capacity_gb: float) -> MemoryBreakdown:
    """The fullest node's host RAM; `nodes`: each node's rows (inference and training tasks)."""
    node = max(range(len(nodes)), key=lambda i: sum(r.gb for r in nodes[i]))
    return MemoryBreakdown(f"host RAM per node (fullest: node {node} of {len(nodes)})", nodes[node],
                           capacity_gb=capacity_gb, usable_fraction=HOST_USABLE_FRACTION)
