"""How long one weight sync takes on the cluster, from the plan and stated link bandwidths.

Pure arithmetic (no torch): which bytes cross which link when `tulu.dist.weight_sync` moves a
preset's model from its training stages to its engines, and the seconds that takes. Used by
``bench/bench_weight_sync.py --model-plan`` and :func:`predicted_sync_seconds` (for ``tulu plan``).

Placement is the plan's (`tulu.plan.layout.RankPlan.role_of`): inference ranks first, node by node
(an engine's TP ranks, then its next PP stage), training ranks after them; training stage ``s``'s
leader is its TP rank 0 of DP replica 0 and its TP group shares a node. Every link's bytes are
counted; a link's seconds are its bytes over its rate (``Links``: stated, not measured). Buckets
are pipelined, so a design's predicted time is its busiest link's; ``serial_s`` adds the steps one
after the other (the bound if nothing overlapped).

Designs (``DESIGNS``):

- ``gloo_host`` (implemented, tested on CPU): each stage leader gathers its TP shards (NVLink),
  copies buckets to host memory and sends each bucket over gloo/TCP to one receiver per engine node
  that holds it (routing by engine PP stage), which passes it on to the rest of its node (gloo).
- ``nccl_routed_fanout`` (implemented, not yet run on a GPU; what a GPU job uses): the same routing and
  fan-out over NCCL with GPU buffers. A bucket goes from the leader's GPU to one GPU per engine node
  (stage ``s`` to the node's ``s``-th receiver): one NIC each way; the fan-out within the node is an
  NVLink broadcast. Engine ranks receive up to ``rlvr.weight_sync_streams`` stages at once, so a
  node's stages come in through that many NICs side by side; the busiest NIC is one stage's.
- ``nccl_tp_sharded`` (modelled, not implemented): each training TP rank sends its own shard to the
  engine TP rank that holds the same shard, so all of a node's NICs carry 1/TP of the bytes each
  and nothing is gathered or fanned out. Applies only where training TP == engine TP (see
  :data:`TP_SHARDING_LIMITS`); elsewhere it falls back to ``nccl_routed_fanout``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["DESIGNS", "Links", "SyncPrediction", "TP_SHARDING_LIMITS", "model_sync", "predicted_sync_seconds",
           "sync_plan_lines"]

DESIGNS = ("gloo_host", "nccl_routed_fanout", "nccl_tp_sharded")

# Where a training TP rank's shard is not an engine TP rank's shard, and what moves instead.
TP_SHARDING_LIMITS = (
    "training TP != engine TP (e.g. the 8B preset: TP4 training, TP1 engines): shards do not match; "
    "the stage leader gathers full tensors over NVLink (iter_hf_weights) and sends those",
    "vocabulary rows (embed_tokens, lm_head): this project's Megatron pads the vocabulary to a multiple "
    "of TP (tulu.models.llama.padded_vocab_size), vLLM to a multiple of 64, then splits by TP; they match "
    "when both give the same rows (Llama 3's 128256 at TP8: 16032 rows a rank on both sides; "
    "facts.vocab_shards_match). Where they differ, an engine rank's rows span two training shards: "
    "the overlapping row ranges go point to point (same bytes, no gather)",
    "fused QKV: Megatron's linear_qkv shard is [q, k, v] per KV group, vLLM's qkv_proj shard is "
    "[q..., k..., v...] over the rank's groups: the same bytes when a rank holds one KV group "
    "(Llama 3 8B/405B: 8 KV heads at TP8); with more groups a rank, the receiver permutes rows "
    "locally (no communication)",
    "gate/up (Megatron linear_fc1 [gate_r; up_r] = vLLM gate_up_proj's shard) and o/down (both "
    "split the input dimension) match as they are; norms are replicated: sent whole, once per node",
    "pipeline stages: training PP and engine PP split the layers differently (405B: PP10 of "
    "11/13x8/11 layers vs PP2 of 63/63); each training stage's layers go to the engine PP rank that "
    "holds them (a stage straddling an engine boundary sends to both); nothing is gathered across PP",
    "the engine side must load a shard into vLLM's parameter as is (vLLM's load_weights slices full "
    "tensors itself): a loader of our own, not written yet",
)


@dataclass(frozen=True)
class Links:
    """Stated bandwidths (defaults: an H100 node with 8 x 400 Gb/s InfiniBand, NVLink 4)."""

    ib_gbit_per_nic: float = 400.0      # one NIC, one direction, Gb/s; one NIC per GPU
    nics_per_node: int = 8
    nvlink_gbyte: float = 900.0         # one GPU, both directions together (450 GB/s each way)
    gloo_tcp_gbyte: float = 2.0         # one gloo TCP stream with host buffers between nodes (assumed)
    efficiency: float = 0.8             # fraction of a link's rate a collective reaches

    @property
    def nic(self) -> float:             # GB/s one GPU's NIC carries one way
        return self.ib_gbit_per_nic / 8 * self.efficiency

    @property
    def nvlink_one_way(self) -> float:
        return self.nvlink_gbyte / 2 * self.efficiency

    @property
    def tcp(self) -> float:
        return self.gloo_tcp_gbyte * self.efficiency


@dataclass
class SyncPrediction:
    design: str
    predicted_s: float
    serial_s: float
    seconds: dict            # per link kind: the busiest link's seconds
    link_bytes: dict         # per link kind: the busiest link's bytes
    applies: bool = True
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Layout:
    gpn: int
    tp: int                        # training
    dp: int
    stage_layers: tuple            # training: [first, end) per stage
    inf_gpus: int
    inf_tp: int
    inf_pp: int
    inf_stage_layers: tuple        # engine PP: [first, end) per stage
    layer_bytes: int
    embed_bytes: int
    head_bytes: int                # lm_head (untied) + final norm
    num_layers: int
    streams: int = 8               # training stages an engine rank receives at once


def _layout(cfg, plan) -> _Layout:
    from tulu.plan.layout import layer_spans, layers_per_stage

    shape = plan.shape
    dtype_bytes = 4 if cfg.model.dtype == "fp32" else 2
    return _Layout(plan.gpus_per_node, plan.training_tp, plan.training_dp,
                   layer_spans(layers_per_stage(shape.num_layers, plan.training_pp)),
                   plan.inference_gpus, plan.inference_tp, plan.inference_pp,
                   layer_spans(layers_per_stage(shape.num_layers, plan.inference_pp)),
                   shape.params_per_layer * dtype_bytes, shape.embedding_params * dtype_bytes,
                   ((0 if shape.tied_embeddings else shape.embedding_params) + shape.hidden_size) * dtype_bytes,
                   shape.num_layers, cfg.rlvr.weight_sync_streams)


def _bytes(lay: _Layout, layers: tuple, embed: bool, head: bool) -> int:
    return (layers[1] - layers[0]) * lay.layer_bytes + (lay.embed_bytes if embed else 0) + (lay.head_bytes if head else 0)


def _overlap(a: tuple, b: tuple) -> tuple:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, max(lo, hi))


def _stage_to_engine_stage(lay: _Layout) -> dict[tuple[int, int], int]:
    """{(training stage, engine PP stage): bytes of the training stage that engine stage holds}."""
    last_t, last_i = len(lay.stage_layers) - 1, lay.inf_pp - 1
    out = {}
    for s, tl in enumerate(lay.stage_layers):
        for p, il in enumerate(lay.inf_stage_layers):
            b = _bytes(lay, _overlap(tl, il), s == 0 and p == 0, s == last_t and p == last_i)
            if b:
                out[(s, p)] = b
    return out


def _node_receivers(lay: _Layout) -> dict[int, dict[int, list[int]]]:
    """{inference node: {engine PP stage: the node's ranks holding it, in rank order}}."""
    nodes: dict[int, dict[int, list[int]]] = {}
    per_engine = lay.inf_tp * lay.inf_pp
    for g in range(lay.inf_gpus):
        nodes.setdefault(g // lay.gpn, {}).setdefault((g % per_engine) // lay.inf_tp, []).append(g)
    return nodes


def _routed_fanout(lay: _Layout, links: Links, nccl: bool) -> SyncPrediction:
    pieces = _stage_to_engine_stage(lay)
    nodes = _node_receivers(lay)
    stages = range(len(lay.stage_layers))
    # training stage s into engine node n: what the node's engine stages hold of s, once per node
    # (fan-out), however many ranks or engines there hold it
    into = {(s, n): sum(pieces.get((s, p), 0) for p in held) for s in stages for n, held in nodes.items()}
    node_in = max(sum(into[(s, n)] for s in stages) for n in nodes)
    # Stage s enters node n through one head GPU (weight_sync._fan_out): the s-th (mod their number)
    # of the node's ranks that hold any of it; a receiver takes up to `streams` stages at once, so
    # different heads' NICs carry different stages side by side.
    head_in: dict[tuple[int, int], int] = {}
    for n, held in nodes.items():
        for s in stages:
            ranks = sorted(r for p, rs in held.items() if pieces.get((s, p)) for r in rs)
            if ranks:
                head = ranks[s % len(ranks)]
                head_in[(n, head)] = head_in.get((n, head), 0) + into[(s, n)]
    heads = {n: sum(1 for (n2, _) in head_in if n2 == n) for n in nodes}
    concurrent = {n: max(1, min(lay.streams, heads[n])) for n in nodes}
    # held bytes of engine stage p (all training stages), and the relay within a node
    stage_held = {p: sum(b for (_, p2), b in pieces.items() if p2 == p) for p in range(lay.inf_pp)}
    fanout_gpu_in = max((stage_held[p] for held in nodes.values() for p, rs in held.items() if len(rs) > 1), default=0)
    fanout_head_out = max(sum(stage_held[p] * (len(rs) - 1) for p, rs in held.items()) for held in nodes.values())
    stage_bytes = [_bytes(lay, tl, s == 0, s == len(lay.stage_layers) - 1) for s, tl in enumerate(lay.stage_layers)]
    gather = max(stage_bytes) * (lay.tp - 1) / lay.tp
    nvl, kinds = links.nvlink_one_way, {}
    kinds["training_tp_gather_nvlink"] = (gather, gather / 1e9 / nvl)
    if nccl:
        # an NCCL broadcast pipelines through its receivers: the root sends each bucket once
        leader_out = max(sum(b for (s2, _), b in pieces.items() if s2 == s) for s in stages)
        kinds["stage_leader_nic_out"] = (leader_out, leader_out / 1e9 / links.nic)
        # the busiest head NIC, or the node's bytes over the NICs its streams keep busy at once
        busiest = max(head_in.values())
        node_s = max(max(max(b for (n2, _), b in head_in.items() if n2 == n),
                         sum(into[(s, n)] for s in stages) / concurrent[n]) / links.nic for n in nodes)
        kinds["engine_head_nic_in"] = (busiest, node_s / 1e9)
        kinds["engine_node_fanout_nvlink_in"] = (fanout_gpu_in, fanout_gpu_in / 1e9 / nvl)
        note = (f"stages enter each engine node through up to {max(concurrent.values())} head GPUs' NICs at once "
                f"(of {links.nics_per_node}); {node_in / 1e9:.1f} GB into the fullest node")
    else:
        # gloo's broadcast root sends the bucket to each head in turn; a head to each peer in turn
        leader_out = max(sum(into[(s, n)] for n in nodes) for s in stages)
        kinds["stage_leader_tcp_out"] = (leader_out, leader_out / 1e9 / links.tcp)
        kinds["engine_node_head_tcp_in"] = (node_in, node_in / 1e9 / links.tcp)
        kinds["engine_node_fanout_gloo_out"] = (fanout_head_out, fanout_head_out / 1e9 / links.tcp)
        note = "gloo over TCP with host buffers (device<->host copies not counted; one host NIC a node)"
    return _prediction("nccl_routed_fanout" if nccl else "gloo_host", kinds, note)


def _tp_sharded(lay: _Layout, links: Links) -> SyncPrediction:
    if lay.tp != lay.inf_tp or lay.inf_tp > lay.gpn:
        p = _routed_fanout(lay, links, nccl=True)
        p.design, p.applies = "nccl_tp_sharded", False
        p.note = (f"training TP{lay.tp} vs engine TP{lay.inf_tp}: shards do not match; "
                  "the same as nccl_routed_fanout")
        return p
    pieces = _stage_to_engine_stage(lay)
    engines = lay.inf_gpus // (lay.inf_tp * lay.inf_pp)
    # each training GPU sends its 1/TP of each piece to each engine's matching TP rank
    gpu_out = max(sum(b for (s2, _), b in pieces.items() if s2 == s) for s in range(len(lay.stage_layers))) \
        * engines / lay.tp
    gpu_in = max(sum(b for (_, p2), b in pieces.items() if p2 == p) for p in range(lay.inf_pp)) / lay.tp
    kinds = {"training_gpu_nic_out": (gpu_out, gpu_out / 1e9 / links.nic),
             "engine_gpu_nic_in": (gpu_in, gpu_in / 1e9 / links.nic)}
    return _prediction("nccl_tp_sharded", kinds, "every GPU's own NIC; no gather, no fan-out (not implemented)")


def _prediction(design: str, kinds: dict, note: str) -> SyncPrediction:
    seconds = {k: round(t, 3) for k, (_, t) in kinds.items()}
    return SyncPrediction(design, round(max(seconds.values()), 2), round(sum(seconds.values()), 2), seconds,
                          {k: int(b) for k, (b, _) in kinds.items()}, True, note)


def _vocab_shards_match(vocab: int, tp: int, inf_tp: int) -> bool:
    """Training TP rank r's embedding rows == engine TP rank r's (Megatron pads to a multiple of
    TP here, vLLM to a multiple of 64 and then splits by TP)."""
    megatron = -(-vocab // tp) * tp
    vllm = -(-vocab // 64) * 64
    return tp == inf_tp and megatron == vllm and vllm % inf_tp == 0


def model_sync(cfg, plan=None, links: Links | None = None) -> dict:
    """Every design's :class:`SyncPrediction` for ``cfg``'s model over its plan, with the facts
    they rest on: ``{"facts": {...}, "designs": {name: SyncPrediction}}``."""
    if plan is None:
        from tulu.plan.layout import build_plan

        plan = build_plan(cfg)
    if not plan.inference_gpus:
        raise ValueError(f"{cfg.run.name}: no inference engines "
                         "(groups.inference.gpus: 0), so no weight sync to model")
    links = links or Links()
    lay = _layout(cfg, plan)
    m = cfg.monitoring
    total = lay.num_layers * lay.layer_bytes + lay.embed_bytes + lay.head_bytes
    facts = {"bytes": total, "training": f"TP{lay.tp} PP{len(lay.stage_layers)} DP{lay.dp}",
             "training_stage_layers": [b - a for a, b in lay.stage_layers],
             "inference": f"{lay.inf_gpus // (lay.inf_tp * lay.inf_pp)} engine(s) x TP{lay.inf_tp} PP{lay.inf_pp} "
                          f"({lay.inf_gpus} GPUs, {-(-lay.inf_gpus // lay.gpn)} node(s))",
             "engine_stage_gb": [round(_bytes(lay, r, p == 0, p == lay.inf_pp - 1) / 1e9, 1)
                                 for p, r in enumerate(lay.inf_stage_layers)],
             "vocab_shards_match": _vocab_shards_match(plan.shape.vocab_size, lay.tp, lay.inf_tp),
             "weight_sync_timeout_s": m.phase_timeouts_s.get("weight_sync", m.default_timeout_s),
             "links": {**asdict(links), "nic_gbyte_used": links.nic, "nvlink_one_way_gbyte_used": links.nvlink_one_way,
                       "tcp_gbyte_used": links.tcp}}
    return {"facts": facts, "designs": {"gloo_host": _routed_fanout(lay, links, nccl=False),
                                        "nccl_routed_fanout": _routed_fanout(lay, links, nccl=True),
                                        "nccl_tp_sharded": _tp_sharded(lay, links)}}


def predicted_sync_seconds(cfg, plan=None, links: Links | None = None, design: str = "nccl_routed_fanout") -> float:
    """Predicted seconds of one weight sync of ``cfg`` (an RLVR job) with the code a GPU job runs
    (``nccl_routed_fanout``), from stated link bandwidths (:class:`Links`)."""
    if design not in DESIGNS:
        raise ValueError(f"weight sync design {design!r}: expected one of {', '.join(DESIGNS)}")
    return model_sync(cfg, plan, links)["designs"][design].predicted_s


def sync_plan_lines(cfg, plan=None, links: Links | None = None, warn_fraction: float = 0.5) -> list[str]:
    """Lines for ``tulu plan``: the predicted sync time and a warning when it nears the
    ``weight_sync`` phase time-out (more than ``warn_fraction`` of it). Nothing for a job without
    engines."""
    if plan is None:
        from tulu.plan.layout import build_plan

        plan = build_plan(cfg)
    if not plan.inference_gpus:
        return []
    links = links or Links()
    out = model_sync(cfg, plan, links)
    facts, d = out["facts"], out["designs"]
    p = d["nccl_routed_fanout"]
    timeout = facts["weight_sync_timeout_s"]
    lines = [f"weight sync: {facts['bytes'] / 1e9:.1f} GB per sync, predicted {p.predicted_s:.1f} s on NCCL "
             f"(busiest link: {max(p.seconds, key=p.seconds.get)}; stated links: {links.ib_gbit_per_nic:g} Gb/s IB x "
             f"{links.nics_per_node}/node, NVLink {links.nvlink_gbyte:g} GB/s, {links.efficiency:g} efficiency)"]
    if timeout and p.predicted_s > warn_fraction * timeout:
        lines.append(f"WARNING: the predicted weight sync ({p.predicted_s:.0f} s) is over {warn_fraction:.0%} of the "
                     f"weight_sync phase time-out ({timeout:g} s, monitoring.phase_timeouts_s.weight_sync): a slow link "
                     "will look like a hang; raise the time-out")
    return lines
