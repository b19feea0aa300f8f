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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tulu.config.shapes import ModelShape

GB = 1e9
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

    @property
    def total_gb(self) -> float:
        return sum(r.gb for r in self.rows)

    @property
    def usable_gb(self) -> float:
        return self.capacity_gb * USABLE_FRACTION

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
                     f"({self.capacity_gb:.0f} GB x {USABLE_FRACTION}): {verdict}")
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
    opt_full = p_gpu * 12
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
        v_opt = v_gpu * 12 / (m.dp if m.distributed_optimizer else 1)
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


def inference_memory(shape: ModelShape, tp: int, pp: int, capacity_gb: float, utilization: float,
                     weight_bytes: int = 2) -> InferenceMemory:
    shards = tp * pp
    weights = shape.num_params * weight_bytes / shards / GB
    runtime = 2.0  # vLLM activations, sampler and CUDA graphs at default settings
    budget = capacity_gb * utilization
    kv = budget - weights - runtime
    b = MemoryBreakdown(f"inference GPU (vLLM, TP{tp} x PP{pp}, gpu_memory_utilization {utilization})",
                        capacity_gb=capacity_gb)
    b.rows.append(MemoryRow("weights (bf16)", weights))
    b.rows.append(MemoryRow("vLLM activations, sampler, CUDA graphs", runtime))
    b.rows.append(MemoryRow("KV cache", max(kv, 0.0), f"{budget:.1f} GB budget minus the rest"))
    per_token = shape.kv_bytes_per_token(weight_bytes) / shards
    tokens = int(max(kv, 0.0) * GB / per_token) if per_token else 0
    return InferenceMemory(b, kv, tokens)
