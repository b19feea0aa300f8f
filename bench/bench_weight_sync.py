"""Weight-sync bandwidth over a real bridge (gloo, this machine): the bucketed stream the RLVR
loop uses (`tulu.dist.weight_sync`: names + index through the store, flat buckets broadcast per stage)
against a raw broadcast of one flat buffer of the same size, in the same run.

Processes: 1 pipeline-stage leader + N inference ranks (default 2). The "model" is a list of
Llama-shaped fp32 tensors (default ~64 MB). One JSON line per figure. Repeats alternate bucketed
and raw so both see the same machine load; the best of each is reported.

    python bench/bench_weight_sync.py [--quick] [--mb 64] [--receivers 2] [--bucket-mb 16] [--tensor-mb 4] [--norms]

``--model-plan [CONFIG ...]`` measures nothing: it models one sync of each config's model (default:
the 405B and 8B RLVR presets) over its rank plan - bytes per link and predicted seconds from stated
link bandwidths (8 x 400 Gb/s InfiniBand per node, NVLink 900 GB/s, 80% efficiency; flags change
them) - for each design of `tulu.dist.sync_model`, and writes the JSON lines to
``bench/results/weight_sync_scale-DATE.jsonl`` (``--out``).
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


def model_plan_lines(configs: list[str], links) -> list[dict]:
    """One weight sync of each config's model over its rank plan: bytes per link and predicted
    seconds per design (`tulu.dist.sync_model`), from the stated ``links``. Pure arithmetic."""
    from tulu.config.job import load_config
    from tulu.dist.sync_model import TP_SHARDING_LIMITS, model_sync

    out = []
    root = Path(__file__).resolve().parents[1]
    for config in configs:
        cfg = load_config(config if Path(config).exists() else str(root / config))
        m = model_sync(cfg, links=links)
        out.append({"bench": "weight_sync_scale", "config": config, "model": cfg.model.name_or_path, **m["facts"]})
        for p in m["designs"].values():
            out.append({"bench": "weight_sync_scale", "config": config, **p.as_dict(),
                        "fits_timeout": p.predicted_s < (m["facts"]["weight_sync_timeout_s"] or float("inf")),
                        "meets_10s_goal": p.predicted_s <= 10.0})
    out.append({"bench": "weight_sync_scale", "tp_sharding_limits": list(TP_SHARDING_LIMITS)})
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
    ap.add_argument("--model-plan", metavar="CONFIG", nargs="*",
                    help="model one sync of each CONFIG's model (default: the 405B and 8B RLVR presets); measure nothing")
    ap.add_argument("--out", help="with --model-plan: the .jsonl to write (default bench/results/weight_sync_scale-DATE.jsonl)")
    ap.add_argument("--ib-gbit", type=float, default=400.0, help="one InfiniBand NIC (one per GPU), Gb/s")
    ap.add_argument("--nics-per-node", type=int, default=8)
    ap.add_argument("--nvlink-gbyte", type=float, default=900.0, help="NVLink, one GPU, both directions, GB/s")
    ap.add_argument("--tcp-gbyte", type=float, default=2.0,
                    help="one gloo TCP stream with host buffers between nodes, GB/s (assumed)")
    ap.add_argument("--efficiency", type=float, default=0.8, help="fraction of link rate a collective reaches")
    a = ap.parse_args()
    if a.model_plan is not None:
        from tulu.dist.sync_model import Links

        links = Links(ib_gbit_per_nic=a.ib_gbit, nics_per_node=a.nics_per_node, nvlink_gbyte=a.nvlink_gbyte,
                      gloo_tcp_gbyte=a.tcp_gbyte, efficiency=a.efficiency)
        configs = a.model_plan or ["configs/tulu3-405b-rlvr.yaml", "configs/tulu3-8b-rlvr.yaml"]
        lines = model_plan_lines(configs, links)
        out = Path(a.out) if a.out else (Path(__file__).parent / "results" /
                                         f"weight_sync_scale-{time.strftime('%Y-%m-%d')}.jsonl")
        out.write_text("".join(json.dumps(x) + "\n" for x in lines))
        for x in lines:
            if "design" in x:
                print(f"{Path(x['config']).stem:18s} {x['design']:20s} predicted {x['predicted_s']:8.2f} s  "
                      f"(serial {x['serial_s']:8.2f} s){'' if x['applies'] else '  [does not apply]'}")
                for k, sec in x["seconds"].items():
                    print(f"{'':40s}{k:32s} {x['link_bytes'][k] / 1e9:9.1f} GB  {sec:8.2f} s")
            elif "links" in x:
                print(f"{Path(x['config']).stem}: {x['bytes'] / 1e9:.1f} GB, training {x['training']}, "
                      f"{x['inference']}, weight_sync time-out {x['weight_sync_timeout_s']} s; links: {x['links']}")
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
