"""The rank plan: nodes x GPUs -> inference group + training group, TP/PP/DP, memory per GPU.

Global ranks are laid out inference first (the first nodes), then training. Inside the training
group ranks follow Megatron's default order (tp fastest, then dp, then pp), so
`role_rank = tp_rank + tp * (dp_rank + dp * pp_rank)`. The bridge group joins each pipeline
stage's leader (tp 0, dp 0) with every inference rank: leaders first, then inference ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tulu.config.job import ConfigError, JobConfig
from tulu.plan.memory import (
    InferenceMemory,
    MemoryBreakdown,
    TrainingMemoryInputs,
    inference_host_rows,
    inference_memory,
    weight_sync_buffers_gb,
    node_host_memory,
    training_host_rows,
    training_memory,
)
from tulu.config.shapes import ARCHITECTURES, ModelShape, resolve_shape


class PlanError(ConfigError):
    """The layout cannot run: it does not divide or does not fit. Carries the breakdown."""


def layers_per_stage(num_layers: int, pp: int) -> tuple[int, ...]:
    """Even split when it divides; otherwise lighter first/last stages (they also hold the
    embedding and the output layer), as Megatron's `num_layers_in_{first,last}_pipeline_stage`
    allow. 126 layers in 10 stages -> 11, 13 x 8, 11."""
    if pp < 1 or num_layers < pp:
        raise ValueError(f"cannot split {num_layers} layers into {pp} pipeline stages")
    if num_layers % pp == 0:
        return (num_layers // pp,) * pp
    if pp == 2:
        return (num_layers // 2, num_layers - num_layers // 2)
    splits = []
    for edge in range(1, num_layers):
        middle, rem = divmod(num_layers - 2 * edge, pp - 2)
        if rem == 0 and middle >= 1:
            splits.append((edge,) + (middle,) * (pp - 2) + (edge,))
    if splits:  # the most even split, lighter edges first
        return min(splits, key=lambda s: (max(s) - min(s), s[0] > s[1]))
    raise ValueError(f"cannot split {num_layers} layers into {pp} pipeline stages")


@dataclass(frozen=True, slots=True)
class RankRole:
    global_rank: int
    node: int
    local_rank: int
    role: str  # "inference" | "training"
    role_rank: int
    role_world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int  # training: data-parallel rank; inference: engine index
    bridge_rank: int | None  # None: not in the bridge group


@dataclass(slots=True)
class Candidate:
    tp: int
    pp: int
    dp: int
    memory: MemoryBreakdown

    @property
    def label(self) -> str:
        return f"TP{self.tp} x PP{self.pp} x DP{self.dp}"


@dataclass(slots=True)
class RankPlan:
    nodes: int
    gpus_per_node: int
    inference_gpus: int
    inference_tp: int
    inference_pp: int
    training_tp: int
    training_pp: int
    training_dp: int
    layers: tuple[int, ...]
    shape: ModelShape
    training_mem: MemoryBreakdown | None = None
    inference_mem: InferenceMemory | None = None
    alternatives: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inference_engine: str = "vllm"
    host_mem: MemoryBreakdown | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def training_gpus(self) -> int:
        return self.world_size - self.inference_gpus

    @property
    def inference_engines(self) -> int:
        return self.inference_gpus // (self.inference_tp * self.inference_pp) if self.inference_gpus else 0

    @property
    def bridge_size(self) -> int:
        return self.training_pp + self.inference_gpus if self.inference_gpus else 0

    def training_coords(self, role_rank: int) -> tuple[int, int, int]:
        tp, dp = self.training_tp, self.training_dp
        return role_rank % tp, (role_rank // tp) % dp, role_rank // (tp * dp)

    def role_of(self, global_rank: int) -> RankRole:
        if not 0 <= global_rank < self.world_size:
            raise ValueError(f"rank {global_rank} outside world of {self.world_size}")
        node, local = divmod(global_rank, self.gpus_per_node)
        if global_rank < self.inference_gpus:
            per_engine = self.inference_tp * self.inference_pp
            engine, in_engine = divmod(global_rank, per_engine)
            return RankRole(global_rank, node, local, "inference", global_rank, self.inference_gpus,
                            in_engine % self.inference_tp, in_engine // self.inference_tp, engine,
                            self.training_pp + global_rank)
        r = global_rank - self.inference_gpus
        tp_rank, dp_rank, pp_rank = self.training_coords(r)
        bridge = pp_rank if (self.inference_gpus and tp_rank == 0 and dp_rank == 0) else None
        return RankRole(global_rank, node, local, "training", r, self.training_gpus, tp_rank, pp_rank, dp_rank,
                        bridge)

    def bridge_members(self) -> list[int]:
        """Global ranks in bridge-rank order."""
        if not self.inference_gpus:
            return []
        leaders = [self.inference_gpus + pp * self.training_tp * self.training_dp for pp in range(self.training_pp)]
        return leaders + list(range(self.inference_gpus))

    def describe(self) -> str:
        lines = [
            f"model: {self.shape.name} ({_count(self.shape.num_params)} parameters, "
            f"{self.shape.num_layers} layers, bf16 weights {self.shape.num_params * 2 / 1e9:.1f} GB)",
            f"cluster: {self.nodes} nodes x {self.gpus_per_node} GPUs = {self.world_size} ranks",
        ]
        if self.inference_gpus:
            first_t_node = self.inference_gpus // self.gpus_per_node
            lines.append(
                f"inference group: ranks 0-{self.inference_gpus - 1} ({self.inference_gpus} GPUs, nodes 0-"
                f"{(self.inference_gpus - 1) // self.gpus_per_node}): {self.inference_engines} {self.inference_engine} engine(s) of "
                f"TP{self.inference_tp} x PP{self.inference_pp}")
        else:
            first_t_node = 0
        lines.append(
            f"training group: ranks {self.inference_gpus}-{self.world_size - 1} ({self.training_gpus} GPUs, nodes "
            f"{first_t_node}-{self.nodes - 1}): TP{self.training_tp} x PP{self.training_pp} x DP{self.training_dp}")
        lines.append(f"layers per pipeline stage: {', '.join(map(str, self.layers))}")
        if self.bridge_size:
            lines.append(f"bridge group: {self.training_pp} pipeline-stage leader(s) + {self.inference_gpus} "
                         f"inference rank(s) = {self.bridge_size} ranks (global ranks {self.bridge_members()[:self.training_pp]} + inference)")
        if self.training_mem:
            lines += ["", self.training_mem.table()]
        if self.inference_mem:
            im = self.inference_mem
            lines += ["", im.breakdown.table().rsplit("\n", 1)[0],
                      f"  KV cache holds ~{im.kv_tokens:,} tokens per engine"]
        if self.host_mem:
            lines += ["", self.host_mem.table()]
        if self.alternatives:
            same_tp = [c for c in self.alternatives if c.tp == self.training_tp]
            best = best_candidate(self.alternatives)
            lines += ["", f"training layouts with TP{self.training_tp} (fullest stage):"]
            for c in same_tp + ([best] if best and best not in same_tp else []):
                mark = "<- chosen" if (c.tp, c.pp, c.dp) == (self.training_tp, self.training_pp, self.training_dp) else ""
                verdict = "fits" if c.memory.fits else "does not fit"
                lines.append(f"  {c.label:<22}{c.memory.total_gb:7.1f} GB  {verdict} {mark}".rstrip())
            others = len(self.alternatives) - len(same_tp)
            if others:
                lines.append(f"  ({others} layouts with other TP sizes considered; "
                             f"fewest model-parallel ways that fit: {best.label if best else 'none'})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _seq_len(cfg: JobConfig) -> tuple[int, int]:
    """(sequence length, sequences per micro-batch) the trainer sees."""
    if cfg.stage == "rlvr":
        return cfg.groups.inference.max_model_len, 1
    st = cfg.stage_config
    return st.max_seq_len, 2 if cfg.stage == "dpo" else 1


def _hub_cache(cfg: JobConfig) -> str | None:
    """The Hugging Face cache the job's tasks will read (``cluster.env``), so the plan sees the
    same config.json they will."""
    return cfg.cluster.env.get("HF_HUB_CACHE") or None


def _memory_inputs(cfg: JobConfig, shape: ModelShape, tp: int, pp: int, dp: int) -> TrainingMemoryInputs:
    t = cfg.groups.training
    seq, per_mb = _seq_len(cfg)
    needs_ref = (cfg.stage == "dpo" and cfg.stage_config.reference_logprobs == "frozen_model") or (
        cfg.stage == "rlvr" and cfg.stage_config.kl_beta > 0)
    value_shape = None
    if cfg.stage == "rlvr" and cfg.stage_config.algorithm == "ppo":
        vm = cfg.model.value_model
        value_shape = ARCHITECTURES.get(vm) if vm else shape
        if value_shape is None:
            value_shape = resolve_shape(type(cfg.model)(name_or_path=vm), _hub_cache(cfg))
    wbytes = 2 if cfg.model.dtype == "bf16" else 4
    return TrainingMemoryInputs(
        shape=shape, tp=tp, pp=pp, dp=dp, layers_per_stage=layers_per_stage(shape.num_layers, pp),
        seq_len=seq, micro_batch_size=t.micro_batch_size, weight_bytes=wbytes,
        grad_bytes=2 if t.grad_dtype == "bf16" else 4, distributed_optimizer=t.distributed_optimizer,
        sequence_parallel=t.sequence_parallel, recompute=t.recompute, reference_model=needs_ref,
        value_shape=value_shape, sequences_per_micro_batch=per_mb)


def _layout_problem(shape: ModelShape, gpus_per_node: int, tp: int, pp: int) -> str | None:
    if gpus_per_node % tp:
        return f"TP{tp} does not divide {gpus_per_node} GPUs per node (TP groups must stay inside a node)"
    if shape.num_kv_heads % tp:
        return f"TP{tp} does not divide the {shape.num_kv_heads} key/value heads"
    if pp > shape.num_layers:
        return f"PP{pp} exceeds the {shape.num_layers} layers"
    try:
        layers_per_stage(shape.num_layers, pp)
    except ValueError as e:
        return str(e)
    return None


def candidates(cfg: JobConfig, shape: ModelShape, training_gpus: int) -> list[Candidate]:
    out = []
    cap = cfg.cluster.gpu_memory_gb
    for tp in _divisors(cfg.cluster.gpus_per_node):
        for pp in _divisors(training_gpus // tp) if training_gpus % tp == 0 else []:
            if _layout_problem(shape, cfg.cluster.gpus_per_node, tp, pp):
                continue
            dp = training_gpus // (tp * pp)
            out.append(Candidate(tp, pp, dp, training_memory(_memory_inputs(cfg, shape, tp, pp, dp), cap)))
    return out


def best_candidate(cands: list[Candidate]) -> Candidate | None:
    """Fewest model-parallel ways that fit (max DP, least pipeline bubble), then most headroom."""
    fitting = [c for c in cands if c.memory.fits]
    return min(fitting, key=lambda c: (c.tp * c.pp, c.pp, c.memory.total_gb)) if fitting else None


def _multiples_near(value: int, unit: int) -> str:
    below = value // unit * unit
    return ", ".join(str(v) for v in (below, below + unit) if v >= unit)


def _check_batch_geometry(cfg: JobConfig, dp: int) -> None:
    """Every DP rank gets whole micro-batches: checked here, before the queue wait, as the trainer
    would check it after (tulu.train.loop.BatchLayout, the RLVR learner's setup)."""
    mbs = cfg.groups.training.micro_batch_size
    unit = mbs * dp
    if cfg.stage == "rlvr":
        rl = cfg.rlvr
        rollouts = rl.prompts_per_step * rl.samples_per_prompt
        if rollouts % unit:
            per = unit // math.gcd(unit, rl.samples_per_prompt)
            raise PlanError("rlvr.prompts_per_step", f"got {rl.prompts_per_step}; prompts_per_step x samples_per_prompt "
                            f"= {rollouts} rollouts must split into whole micro-batches over the training "
                            f"group: a multiple of groups.training.micro_batch_size ({mbs}) x DP ({dp}) = {unit}. "
                            f"Allowed nearby: prompts_per_step {_multiples_near(rl.prompts_per_step, per)}")
        return
    gbs = cfg.stage_config.global_batch_size
    if gbs % unit:
        raise PlanError(f"{cfg.stage}.global_batch_size", f"got {gbs}; must be a multiple of "
                        f"groups.training.micro_batch_size ({mbs}) x DP ({dp}) = {unit}. "
                        f"Allowed nearby: {_multiples_near(gbs, unit)}")


CHECKPOINT_WRITE_GB_S_PER_NODE = 1.0
"""Assumed sustained write rate of one node to the run folder's parallel file system (Lustre and
GPFS clients reach 1-5 GB/s); sizes the time-limit warning."""

STEP_PHASES = ("generate", "score", "train", "weight_sync")


def checkpoint_bytes(cfg: JobConfig, shape: ModelShape) -> int:
    """Bytes one committed checkpoint holds: trained weights + Adam state (fp32 master, m, v) of
    the policy, and of PPO's value model; the frozen reference is not saved."""
    weight = 2 if cfg.model.dtype == "bf16" else 4
    master = 4 if weight == 2 else 0
    per_param = weight + master + 8
    total = shape.num_params * per_param
    if cfg.stage == "rlvr" and cfg.stage_config.algorithm == "ppo":
        vm = cfg.model.value_model
        try:
            vshape = (ARCHITECTURES.get(vm) or resolve_shape(type(cfg.model)(name_or_path=vm), _hub_cache(cfg))
                      if vm else shape)
        except ValueError:  # an unknown value model: count it as large as the policy
            vshape = shape
        total += vshape.num_params * per_param
    return total


def time_limit_warning_s(cfg: JobConfig, plan: "RankPlan") -> tuple[float, str]:
    """Seconds the time-limit warning must leave: reach the next step boundary, then save.

    A healthy step is estimated from the monitor's own rule (a time-out is ``safety_factor`` x a
    healthy phase): the step's phase time-outs / safety_factor. The save: the checkpoint spread
    over the training nodes at :data:`CHECKPOINT_WRITE_GB_S_PER_NODE`."""
    m = cfg.monitoring
    phases = [p for p in STEP_PHASES if p in m.phase_timeouts_s] or ["train"]
    step_s = sum(m.phase_timeouts_s.get(p, m.default_timeout_s) for p in phases) / m.safety_factor
    nodes = max(1, -(-plan.training_gpus // plan.gpus_per_node))
    ckpt = checkpoint_bytes(cfg, plan.shape)
    save_s = ckpt / nodes / (CHECKPOINT_WRITE_GB_S_PER_NODE * 1e9)
    why = (f"a step ~{step_s:.0f} s ({' + '.join(phases)} time-outs / safety_factor {m.safety_factor:g}) + a save "
           f"~{save_s:.0f} s ({ckpt / 1e9:,.0f} GB over {nodes} training node(s) at "
           f"{CHECKPOINT_WRITE_GB_S_PER_NODE:g} GB/s each)")
    return step_s + save_s, why


def _check_time_limit_warning(cfg: JobConfig, plan: "RankPlan") -> None:
    need, why = time_limit_warning_s(cfg, plan)
    plan.notes.append(f"time-limit warning: {cfg.cluster.signal_delay_s} s before the limit; needs >= {need:.0f} s: {why}")
    if cfg.cluster.executor == "slurm" and cfg.cluster.signal_delay_s < need:
        limit_s = cfg.cluster.time_limit_min * 60
        raise PlanError("cluster.signal_delay_s", f"got {cfg.cluster.signal_delay_s}; the warning before the time "
                        f"limit must cover {why} = {need:.0f} s, or the save is cut off and the time since the "
                        f"last checkpoint is lost. Allowed: {math.ceil(need)} to {limit_s - 1} seconds")


def _sync_buffers_gb(cfg: JobConfig, shape: ModelShape, plan: "RankPlan") -> float:
    """An engine rank's weight-sync receive buffers (an RLVR job's; 0 otherwise): it receives the
    training stages that hold its engine stage's layers, up to rlvr.weight_sync_streams at once."""
    if cfg.stage != "rlvr":
        return 0.0
    train = layer_spans(plan.layers)
    stages = max(sum(1 for a, b in train if a < hi and lo < b)
                 for lo, hi in layer_spans(layers_per_stage(shape.num_layers, plan.inference_pp)))
    dtype_bytes = 4 if cfg.model.dtype == "fp32" else 2
    return weight_sync_buffers_gb(cfg.rlvr.weight_sync_bucket_mb, cfg.rlvr.weight_sync_streams, stages,
                                  shape.embedding_params * dtype_bytes)


def layer_spans(counts) -> tuple[tuple[int, int], ...]:
    """[first, end) layer ranges of stages holding ``counts`` layers each, in order."""
    out, first = [], 0
    for n in counts:
        out.append((first, first + n))
        first += n
    return tuple(out)


def build_plan(cfg: JobConfig) -> RankPlan:
    """Validate the layout of `cfg` and compute its memory; raise PlanError with a suggestion."""
    cl, inf, tr = cfg.cluster, cfg.groups.inference, cfg.groups.training
    shape = resolve_shape(cfg.model, _hub_cache(cfg))
    world = cl.world_size
    if inf.gpus >= world:
        raise PlanError("groups.inference.gpus", f"got {inf.gpus}; allowed: fewer than the {world} GPUs of "
                        f"{cl.nodes} nodes x {cl.gpus_per_node}, leaving some for training")
    if inf.gpus and inf.gpus % (inf.tp * inf.pp):
        raise PlanError("groups.inference.gpus", f"got {inf.gpus}; allowed: a multiple of inference TP x PP = "
                        f"{inf.tp * inf.pp} (one engine is TP x PP GPUs)")
    training_gpus = world - inf.gpus
    notes = []
    if (inf.gpus % cl.gpus_per_node) % tr.tp:
        raise PlanError("groups.inference.gpus", f"got {inf.gpus}; the training group would start mid-node and "
                        f"split a TP{tr.tp} group across nodes; use a multiple of {tr.tp}")
    if inf.gpus and inf.tp > cl.gpus_per_node:
        notes.append(f"inference TP{inf.tp} spans nodes; vLLM users report TP>8 across nodes as fragile "
                     f"(consider groups.inference.tp={cl.gpus_per_node}, pp={inf.tp * inf.pp // cl.gpus_per_node})")
    problem = _layout_problem(shape, cl.gpus_per_node, tr.tp, tr.pp)
    if problem:
        if "TP" in problem.split()[0]:
            valid = [t for t in _divisors(cl.gpus_per_node) if shape.num_kv_heads % t == 0]
            raise PlanError("groups.training.tp", f"got {tr.tp}; {problem}. Allowed TP values here: {valid}")
        valid = [p for p in range(1, shape.num_layers + 1)
                 if not _layout_problem(shape, cl.gpus_per_node, tr.tp, p)
                 and training_gpus % (tr.tp * p) == 0]
        raise PlanError("groups.training.pp", f"got {tr.pp}; {problem}. Allowed PP values here (with TP{tr.tp}, "
                                              f"{training_gpus} training GPUs): {valid}")
    cands = candidates(cfg, shape, training_gpus)
    best = best_candidate(cands)
    if training_gpus % (tr.tp * tr.pp):
        valid_pp = [p for p in _divisors(training_gpus // tr.tp) if not _layout_problem(shape, cl.gpus_per_node, tr.tp, p)] \
            if training_gpus % tr.tp == 0 else []
        raise PlanError("groups.training.pp", f"got {tr.pp}; TP{tr.tp} x PP{tr.pp} does not divide the "
                        f"{training_gpus} training GPUs; allowed PP with TP{tr.tp}: {valid_pp}"
                        + (f"; suggested layout: {best.label}" if best else ""))
    dp = training_gpus // (tr.tp * tr.pp)
    if tr.dp != "auto" and tr.dp != dp:
        raise PlanError("groups.training.dp", f"got {tr.dp}; TP{tr.tp} x PP{tr.pp} over {training_gpus} training "
                        f"GPUs gives DP{dp}; set dp: {dp} or 'auto'")
    mem = training_memory(_memory_inputs(cfg, shape, tr.tp, tr.pp, dp), cl.gpu_memory_gb)
    plan = RankPlan(cl.nodes, cl.gpus_per_node, inf.gpus, inf.tp, inf.pp, tr.tp, tr.pp, dp,
                    layers_per_stage(shape.num_layers, tr.pp), shape, mem, None,
                    sorted(cands, key=lambda c: (c.tp, c.pp)), notes, inf.engine)
    if inf.gpus:
        buffers = _sync_buffers_gb(cfg, shape, plan)
        plan.inference_mem = inference_memory(shape, inf.tp, inf.pp, cl.gpu_memory_gb, inf.gpu_memory_utilization,
                                              sync_buffers_gb=buffers)
        if not plan.inference_mem.breakdown.fits:
            im = plan.inference_mem.breakdown
            room = (im.usable_gb - buffers) / cl.gpu_memory_gb     # vLLM's budget that leaves the buffers room
            raise PlanError("groups.inference.gpu_memory_utilization",
                            f"got {inf.gpu_memory_utilization}; vLLM's budget and the weight sync's receive buffers "
                            f"do not fit on an engine GPU together\n{im.table()}\nsuggestion: "
                            f"gpu_memory_utilization <= {math.floor(room * 100) / 100}, or lower "
                            "rlvr.weight_sync_bucket_mb or rlvr.weight_sync_streams")
        if plan.inference_mem.kv_tokens < inf.max_model_len:
            raise PlanError("groups.inference.gpus", f"got {inf.gpus}; a TP{inf.tp} x PP{inf.pp} engine leaves room "
                            f"for {plan.inference_mem.kv_tokens} KV tokens, fewer than max_model_len "
                            f"{inf.max_model_len}\n" + plan.inference_mem.breakdown.table()
                            + "\nsuggestion: raise groups.inference.tp or pp, or gpu_memory_utilization")
    if not mem.fits and cfg.mode == "train":
        hint = (f"suggestion: groups.training.tp={best.tp}, pp={best.pp}, dp={best.dp} needs "
                f"{best.memory.total_gb:.1f} GB" if best else
                "suggestion: no TP/PP split fits; set groups.training.recompute=full, "
                "distributed_optimizer=true, grad_dtype=bf16, or add nodes")
        raise PlanError("groups.training", f"TP{tr.tp} x PP{tr.pp} x DP{dp} does not fit in "
                        f"{cl.gpu_memory_gb:.0f} GB per GPU\n{mem.table()}\n{hint}")
    plan.host_mem = host_memory(cfg, plan)
    if cfg.mode == "train":
        _check_host_memory(cfg, plan)
        _check_batch_geometry(cfg, dp)
        _check_time_limit_warning(cfg, plan)
    return plan


def host_memory(cfg: JobConfig, plan: RankPlan) -> MemoryBreakdown:
    """Host RAM of the fullest node: its tasks by role (and, in training, DP rank 0 or not) x each
    task's peak (tulu.plan.memory)."""
    m = _memory_inputs(cfg, plan.shape, plan.training_tp, plan.training_pp, plan.training_dp)
    nodes: dict[tuple[int, int, int], list] = {}
    per_node = []
    for node in range(plan.nodes):
        roles = [plan.role_of(r) for r in range(node * plan.gpus_per_node, (node + 1) * plan.gpus_per_node)]
        inf = sum(r.role == "inference" for r in roles)
        dp0 = sum(r.role == "training" and r.dp_rank == 0 for r in roles)
        key = (inf, dp0, len(roles) - inf - dp0)
        if key not in nodes:
            rows = inference_host_rows(plan.shape, plan.inference_tp, plan.inference_pp, plan.inference_engine,
                                       inf) if inf else []
            nodes[key] = rows + (training_host_rows(m, dp0, key[2]) if dp0 + key[2] else [])
        per_node.append(nodes[key])
    return node_host_memory(per_node, cfg.cluster.host_memory_gb)


def _check_host_memory(cfg: JobConfig, plan: RankPlan) -> None:
    """A node whose tasks need more host RAM than it has is OOM-killed at the first checkpoint save,
    hours in: refused here, naming the key."""
    mem, cl = plan.host_mem, cfg.cluster
    hint = ("suggestion: more pipeline stages or TP (smaller shards per task: the save peak is "
            "~24 B per parameter of a task's shard), or set cluster.host_memory_gb to what the nodes have")
    if not mem.fits:
        raise PlanError("cluster.host_memory_gb", f"got {cl.host_memory_gb:g}; the fullest node needs "
                        f"{mem.total_gb:.0f} GB of host RAM, more than {mem.usable_gb:.0f} GB usable\n"
                        f"{mem.table()}\n{hint}")
    if cl.mem_gb is not None and mem.total_gb > cl.mem_gb:
        raise PlanError("cluster.mem_gb", f"got {cl.mem_gb:g}; Slurm would limit each node to {cl.mem_gb:g} GB "
                        f"but the fullest node needs {mem.total_gb:.0f} GB of host RAM\n{mem.table()}\n"
                        f"suggestion: raise cluster.mem_gb to at least {math.ceil(mem.total_gb)} or unset it")


def spares_line(cluster) -> str | None:
    """What `tulu plan` says about ``cluster.spare_nodes`` (None without spares)."""
    n = cluster.spare_nodes
    if not n:
        return None
    return (f"spare nodes: {n} (the job allocates {cluster.nodes + n} nodes: the training step runs "
            f"on {cluster.nodes}, and on a hang or crash the monitor swaps the culprit's node for a "
            f"spare and restarts the step inside the allocation; without a spare left it requeues)")
