"""Weight-sync bandwidth over a real bridge (gloo, this machine): the bucketed stream the RLVR
loop uses (`tulu.weight_sync`: names + index through the store, flat buckets broadcast per stage)
against a raw broadcast of one flat buffer of the same size, in the same run.

Processes: 1 pipeline-stage leader + N inference ranks (default 2). The "model" is a list of
Llama-shaped fp32 tensors (default ~64 MB). One JSON line per figure.

    python bench/bench_weight_sync.py [--quick] [--mb 64] [--receivers 2] [--bucket-mb 16]
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


def _tensors(total_mb: float):
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = 512
    out, size, i = [], 0, 0
    while size < total_mb * 2**20:
        t = torch.randn(hidden * 4, hidden, generator=g)
        out.append((f"model.layers.{i}.mlp.up_proj.weight", t))
        size += t.numel() * 4
        i += 1
    return out


def _rank(rank, world, port, total_mb, bucket_mb, repeats, q):
    import torch

    torch.set_num_threads(1)
    from tulu.distributed import BridgeGroup
    from tulu.weight_sync import SyncStats, receive_weights, send_weights

    bridge = BridgeGroup("127.0.0.1", port, rank, world, num_stages=1, timeout_s=300)
    named = _tensors(total_mb) if rank == 0 else None
    nbytes = sum(t.numel() * 4 for _, t in _tensors(total_mb)) if rank else sum(t.numel() * 4 for _, t in named)
    results = {"bucketed": [], "raw": []}
    pg, _ = bridge.stage_group(0)
    for rep in range(repeats):
        bridge.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            send_weights(bridge, 0, named, version=rep, bucket_bytes=int(bucket_mb * 2**20))
        else:
            for _ in receive_weights(bridge, version=rep, stats=SyncStats()):
                pass
        bridge.barrier()
        results["bucketed"].append(time.perf_counter() - t0)
        flat = torch.cat([t.reshape(-1) for _, t in named]) if rank == 0 else torch.empty(nbytes // 4)
        bridge.barrier()
        t0 = time.perf_counter()
        bridge.broadcast(flat, src=0, pg=pg)
        bridge.barrier()
        results["raw"].append(time.perf_counter() - t0)
    q.put((rank, nbytes, results))


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
    a = ap.parse_args()
    mb, repeats = (8, 1) if a.quick else (a.mb, a.repeats)
    world, port = 1 + a.receivers, free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, mb, a.bucket_mb, repeats, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict((r, (n, x)) for r, n, x in (q.get(timeout=600) for _ in procs))
    for p in procs:
        p.join()
    nbytes, times = res[0]
    best = {k: min(v) for k, v in times.items()}
    for k in ("bucketed", "raw"):
        print(json.dumps({"bench": "weight_sync", "method": k, "bytes": nbytes, "receivers": a.receivers,
                          "bucket_mb": a.bucket_mb if k == "bucketed" else None, "seconds": round(best[k], 4),
                          "gb_per_s": round(nbytes / best[k] / 1e9, 3)}))
    print(json.dumps({"bench": "weight_sync", "figure": "bucketed_vs_raw", "ratio": round(best["raw"] / best["bucketed"], 3),
                      "note": "bucketed throughput as a fraction of one raw flat broadcast of the same bytes"}))


if __name__ == "__main__":
    main()
