"""Weight-sync bandwidth over a real bridge (gloo, this machine): the bucketed stream the RLVR
loop uses (`tulu.dist.weight_sync`: names + index through the store, flat buckets broadcast per stage)
against a raw broadcast of one flat buffer of the same size, in the same run.

Processes: 1 pipeline-stage leader + N inference ranks (default 2). The "model" is a list of
Llama-shaped fp32 tensors (default ~64 MB). One JSON line per figure. Repeats alternate bucketed
and raw so both see the same machine load; the best of each is reported.

    python bench/bench_weight_sync.py [--quick] [--mb 64] [--receivers 2] [--bucket-mb 16] [--tensor-mb 4] [--norms]

``--model-plan CONFIG`` measures nothing: it models one sync of the config's model over the
config's rank plan (bytes per link, predicted seconds from the stated link bandwidths) for the
design in this code and for the routed design it does not implement yet, and writes the lines to
``bench/results/`` as well (``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tensors(total_mb: float, norms: bool = False, tensor_mb: float = 4.0):
    """``tensor_mb`` (4) MB matrices; with ``norms`` each is followed by a 2 kB norm vector (a Llama's mix of
    large and tiny tensors: the tiny ones are packed, the large ones sent as is)."""
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = 512
    out, size, i = [], 0, 0
    while size < total_mb * 2**20:
        t = torch.randn(int(tensor_mb * 2**20) // 4 // hidden, hidden, generator=g)
        out.append((f"model.layers.{i}.mlp.up_proj.weight", t))
        size += t.numel() * 4
        if norms:
            out.append((f"model.layers.{i}.post_attention_layernorm.weight", torch.randn(hidden, generator=g)))
            size += hidden * 4
        i += 1
    return out


def _rank(rank, world, port, total_mb, bucket_mb, repeats, norms, tensor_mb, q):
    import torch

    torch.set_num_threads(1)
    from tulu.dist.groups import BridgeGroup
    from tulu.dist.weight_sync import SyncStats, receive_weights, send_weights

    bridge = BridgeGroup("127.0.0.1", port, rank, world, num_stages=1, timeout_s=300)
    named = _tensors(total_mb, norms, tensor_mb)
    nbytes = sum(t.numel() * 4 for _, t in named)
    results = {"bucketed": [], "raw": []}
    pg, _ = bridge.stage_group(0)
    flat, extra = None, {}
    for rep in range(repeats):
        bridge.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            st = send_weights(bridge, 0, named, version=rep, bucket_bytes=int(bucket_mb * 2**20))
            extra["copied_bytes"] = st.copied_bytes
        else:
            stats = SyncStats()
            for _ in receive_weights(bridge, version=rep, stats=stats, bucket_bytes=int(bucket_mb * 2**20)):
                pass
            extra["receive_buffers_allocated"] = stats.buffers_allocated
        bridge.barrier()
        results["bucketed"].append(time.perf_counter() - t0)
        if flat is None:
            flat = torch.cat([t.reshape(-1) for _, t in named]) if rank == 0 else torch.empty(nbytes // 4)
        bridge.barrier()
        t0 = time.perf_counter()
        bridge.broadcast(flat, src=0, pg=pg)
        bridge.barrier()
        results["raw"].append(time.perf_counter() - t0)
    results["extra"] = extra
    q.put((rank, nbytes, results))


def model_plan_lines(config: str, *, ib_gbit: float, nics_per_node: int, nvlink_gbyte: float,
                     tcp_gbyte: float, efficiency: float) -> list[dict]:
    """One weight sync of ``config``'s model over its rank plan: bytes per link, predicted seconds.

    Pure arithmetic from the config (tulu.plan.layout / tulu.config.shapes), no torch. Designs:
    ``this_code`` (tulu.dist.weight_sync as the RLVR loop calls it: every inference rank receives every
    tensor over a gloo/TCP bridge with CPU buffers, streamed), ``this_code_routed_by_pp_stage``
    (the same with ``holds=engine.held_weights()``: each rank gets its pipeline stage) and
    ``routed_node_fanout`` (not implemented: each inference node gets its stage once over
    InfiniBand, split over its NICs, and fans it out to its GPUs over NVLink; NCCL, GPU buffers)."""
    from tulu.config.job import load_config
    from tulu.config.shapes import resolve_shape
    from tulu.plan.layout import build_plan, layers_per_stage

    cfg = load_config(config)
    plan = build_plan(cfg)
    shape = resolve_shape(cfg.model)
    inf, tr = cfg.groups.inference, cfg.groups.training
    dtype_bytes = 4 if cfg.model.dtype == "fp32" else 2
    h = shape.hidden_size
    layer_bytes = shape.params_per_layer * dtype_bytes
    embed = shape.embedding_params * dtype_bytes
    head = (0 if shape.tied_embeddings else embed) + h * dtype_bytes
    train_layers = layers_per_stage(shape.num_layers, tr.pp)
    stage_bytes = [n * layer_bytes + (embed if s == 0 else 0) + (head if s == tr.pp - 1 else 0)
                   for s, n in enumerate(train_layers)]
    total = sum(stage_bytes)
    gpn = cfg.cluster.gpus_per_node
    receivers = inf.gpus                      # every inference rank is a bridge receiver today
    engines = inf.gpus // (inf.tp * inf.pp)
    ib = ib_gbit / 8 * efficiency             # GB/s per NIC
    nvl = nvlink_gbyte * efficiency
    tcp = tcp_gbyte * efficiency
    links = {"ib_gbit_per_nic": ib_gbit, "nics_per_node": nics_per_node, "nvlink_gbyte_per_gpu": nvlink_gbyte,
             "gloo_tcp_gbyte_per_stream": tcp_gbyte, "efficiency": efficiency}
    timeout = cfg.monitoring.phase_timeouts_s.get("weight_sync") if cfg.monitoring.phase_timeouts_s else None
    out = [{"bench": "weight_sync_model", "config": config, "model": cfg.model.name_or_path,
            "params": shape.num_params, "bytes": total, "dtype_bytes": dtype_bytes,
            "training": f"TP{tr.tp} PP{tr.pp} DP{tr.dp}", "training_stage_layers": list(train_layers),
            "training_stage_gb": [round(b / 1e9, 2) for b in stage_bytes],
            "inference": f"{engines} engine(s) x TP{inf.tp} PP{inf.pp} ({inf.gpus} GPUs)",
            "weight_sync_timeout_s": timeout, "links": links,
            "bucket_mb": cfg.rlvr.weight_sync_bucket_mb}]
    # -- this code: a stage leader broadcasts its stage to all `receivers` ranks over gloo/TCP.
    # gloo's broadcast sends the whole buffer to every receiver from the root (one stream each),
    # so the leader's egress is receivers x stage bytes; each receiver's ingress is the model.
    leader_egress = max(stage_bytes) * receivers
    per_rank_in = total
    node_in = total * min(gpn, receivers)
    t_leader = leader_egress / 1e9 / min(tcp * receivers, ib * nics_per_node)
    t_rank = per_rank_in / 1e9 / tcp
    t_node = node_in / 1e9 / (ib * nics_per_node)
    pred = max(t_leader, t_rank, t_node)
    bucket = int(cfg.rlvr.weight_sync_bucket_mb * 2**20)
    largest = max(embed, shape.intermediate_size * h * dtype_bytes)
    out.append({"bench": "weight_sync_model", "design": "this_code",
                "what": "streamed buckets; every inference rank receives every tensor; gloo over TCP, CPU buffers",
                "bytes_into_each_inference_rank": per_rank_in, "bytes_into_each_inference_node": node_in,
                "bytes_out_of_busiest_stage_leader": leader_egress,
                "seconds": {"stage_leader_egress": round(t_leader, 1), "one_rank_tcp_ingress": round(t_rank, 1),
                            "inference_node_nics": round(t_node, 1)},
                "predicted_s": round(pred, 1), "fits_timeout": timeout is None or pred < timeout,
                "receiver_extra_host_bytes": 2 * max(bucket, largest),
                "receiver_extra_host_bytes_before_streaming": total})
    # -- routed: inference PP stage p needs the layers it serves (plus embedding / head).
    inf_layers = layers_per_stage(shape.num_layers, inf.pp)
    inf_bytes = [n * layer_bytes + (embed if p == 0 else 0) + (head if p == inf.pp - 1 else 0)
                 for p, n in enumerate(inf_layers)]
    # this code with holds=engine.held_weights() (tulu.dist.weight_sync routing; the RLVR worker does
    # not pass it yet): each rank gets its PP stage, still over gloo/TCP with CPU buffers
    t_rank_r = max(inf_bytes) / 1e9 / tcp
    t_leader_r = max(stage_bytes) * (receivers // inf.pp) / 1e9 / min(tcp * receivers // inf.pp, ib * nics_per_node)
    pred_cr = max(t_rank_r, t_leader_r, max(inf_bytes) * min(gpn, receivers) / 1e9 / (ib * nics_per_node))
    out.append({"bench": "weight_sync_model", "design": "this_code_routed_by_pp_stage",
                "what": "as this_code, receive_weights(holds=engine.held_weights()): each rank gets its PP stage only",
                "bytes_into_each_inference_rank": max(inf_bytes),
                "seconds": {"one_rank_tcp_ingress": round(t_rank_r, 1), "stage_leader_egress": round(t_leader_r, 1)},
                "predicted_s": round(pred_cr, 1), "fits_timeout": timeout is None or pred_cr < timeout})
    nodes_per_inf_stage = max(1, inf.tp // gpn)
    # each inference node receives its stage once (split across its NICs); the TP ranks of the node
    # all-gather it over NVLink (each GPU takes in the stage's bytes minus its own share)
    node_ib = max(inf_bytes) / nodes_per_inf_stage
    t_node_ib = node_ib / 1e9 / (ib * nics_per_node)
    gpu_nvl = max(inf_bytes) * (1 - 1 / min(gpn, inf.tp))
    t_nvl = gpu_nvl / 1e9 / nvl
    # training side: each stage leader node first gathers its TP shards over NVLink, then sends its
    # stage to the engines' nodes that hold those layers (one copy per engine), over its NICs
    t_tp_gather = max(stage_bytes) * (1 - 1 / tr.tp) / 1e9 / nvl
    egress = max(stage_bytes) * engines
    t_egress = egress / 1e9 / (ib * nics_per_node)
    pred_r = t_tp_gather + max(t_egress, t_node_ib) + t_nvl
    out.append({"bench": "weight_sync_model", "design": "routed_node_fanout (not implemented)",
                "what": "per inference PP stage, once per node over IB (all NICs), NVLink fan-out, NCCL, GPU buffers",
                "inference_stage_gb": [round(b / 1e9, 2) for b in inf_bytes],
                "bytes_into_each_inference_node_ib": int(node_ib), "bytes_into_each_gpu_nvlink": int(gpu_nvl),
                "bytes_out_of_each_training_stage_node": int(egress),
                "seconds": {"training_tp_gather_nvlink": round(t_tp_gather, 2), "training_node_egress": round(t_egress, 2),
                            "inference_node_ib": round(t_node_ib, 2), "inference_nvlink_fanout": round(t_nvl, 2)},
                "predicted_s": round(pred_r, 2),
                "note": "pipelined buckets would overlap these terms; the sum is the unpipelined bound"})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mb", type=float, default=64)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--norms", action="store_true", help="a 2 kB vector after each matrix")
    ap.add_argument("--tensor-mb", type=float, default=4.0, help="size of each matrix (smaller ones are packed)")
    ap.add_argument("--model-plan", metavar="CONFIG", help="model a sync of CONFIG's model; measure nothing")
    ap.add_argument("--out", help="with --model-plan: the .jsonl to write (default bench/results/...)")
    ap.add_argument("--ib-gbit", type=float, default=400.0, help="one InfiniBand NIC, Gb/s")
    ap.add_argument("--nics-per-node", type=int, default=8)
    ap.add_argument("--nvlink-gbyte", type=float, default=450.0, help="NVLink, one GPU, one direction, GB/s")
    ap.add_argument("--tcp-gbyte", type=float, default=2.0,
                    help="one gloo TCP stream with CPU buffers between nodes, GB/s (assumed)")
    ap.add_argument("--efficiency", type=float, default=0.8, help="fraction of link rate a collective reaches")
    a = ap.parse_args()
    if a.model_plan:
        lines = model_plan_lines(a.model_plan, ib_gbit=a.ib_gbit, nics_per_node=a.nics_per_node,
                                 nvlink_gbyte=a.nvlink_gbyte, tcp_gbyte=a.tcp_gbyte, efficiency=a.efficiency)
        out = Path(a.out) if a.out else (Path(__file__).parent / "results" /
                                         f"weight_sync_model-{Path(a.model_plan).stem}-{time.strftime('%Y-%m-%d')}.jsonl")
        out.write_text("".join(json.dumps(x) + "\n" for x in lines))
        for x in lines:
            print(json.dumps(x))
        print(f"written to {out}", file=sys.stderr)
        return
    mb, repeats = (8, 1) if a.quick else (a.mb, a.repeats)
    world, port = 1 + a.receivers, free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, mb, a.bucket_mb, repeats, a.norms, a.tensor_mb, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict((r, (n, x)) for r, n, x in (q.get(timeout=600) for _ in procs))
    for p in procs:
        p.join()
    nbytes, times = res[0]
    best = {k: min(times[k]) for k in ("bucketed", "raw")}
    for k in ("bucketed", "raw"):
        print(json.dumps({"bench": "weight_sync", "method": k, "bytes": nbytes, "receivers": a.receivers,
                          "bucket_mb": a.bucket_mb if k == "bucketed" else None, "norms": a.norms, "tensor_mb": a.tensor_mb, "seconds": round(best[k], 4),
                          "gb_per_s": round(nbytes / best[k] / 1e9, 3),
                          "all_seconds": [round(x, 4) for x in times[k]]}))
    med = {k: sorted(times[k])[len(times[k]) // 2] for k in ("bucketed", "raw")}
    print(json.dumps({"bench": "weight_sync", "figure": "bucketed_vs_raw", "ratio": round(best["raw"] / best["bucketed"], 3),
                      "median_ratio": round(med["raw"] / med["bucketed"], 3),
                      "sender": times["extra"], "receiver": res[1][1]["extra"],
                      "note": "bucketed throughput as a fraction of one raw flat broadcast of the same bytes "
                              "(ratio: best of each; median_ratio: medians)"}))


if __name__ == "__main__":
    main()
