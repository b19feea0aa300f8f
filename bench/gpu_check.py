"""One prepared run for a lent GPU (issues 3 and 4): prints one JSON line per figure.

1. Megatron `GPTModel` (tulu.models, SDPA attention, bf16, fp32 Adam) training step of a ~1B
   Llama config: tokens/s and MFU (6 N tokens / peak).
2. Weight-sync sender side for the same model: Megatron -> HF names (`iter_hf_weights`), packed
   into reused 256 MB buckets (`tulu.dist.weight_sync._buckets`), GB/s.
3. The transformers engine (`tulu.inference.hf_engine`): batched sampling tokens/s.

`--bridge` instead runs the production weight-sync path (issue 15): 2 processes, a stage leader
and an inference rank, `send_weights` -> `receive_weights` over a `BridgeGroup` made for CUDA
(NCCL data groups, GPU buckets, no host copy), ~2 GB of Llama-shaped bf16 tensors, GB/s and an
exactness check. NCCL refuses two ranks on one GPU, so it needs 2 GPUs; with one it measures the
gloo bridge from GPU tensors instead (the host-copy path) and says so. `--tiny --bridge` runs the
same on CPU (gloo).

`--tiny` runs the same code on CPU with a small config, so the script is tested before it
travels. Peak bf16 dense: H100 SXM 989 TFLOP/s, H200 989 TFLOP/s (same chip).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def emit(**kw):
    kw["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(kw), flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bridge_rank(rank: int, port: int, device_type: str, gpus: int, mb: int, repeats: int, q) -> None:
    from tulu.dist.groups import BridgeGroup
    from tulu.dist.weight_sync import SyncStats, receive_weights, send_weights

    if device_type == "cuda":
        torch.cuda.set_device(rank % gpus)
    bridge = BridgeGroup("127.0.0.1", port, rank, 2, num_stages=1, timeout_s=600, device=device_type)
    dev = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    # Llama-3-8B-shaped layers in bf16 (~0.15 GB each); small ones for --tiny
    hidden, ffn = (4096, 14336) if mb >= 1024 else (256, 1024)
    named, size, i = [], 0, 0
    while size < mb * 2**20:
        for part, shape in (("self_attn.q_proj", (hidden, hidden)), ("mlp.up_proj", (ffn, hidden)),
                            ("input_layernorm", (hidden,))):
            t = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(torch.bfloat16)
            named.append((f"model.layers.{i}.{part}.weight", t))
            size += t.numel() * 2
        i += 1
    def checksum(t):        # exact on any device, in any reduction order
        return int(t.reshape(-1).view(torch.int16).to(torch.int64).sum())

    sums = [checksum(t) for _, t in named]
    best, ok, buffers = None, True, 0
    for version in range(repeats):
        bridge.barrier()
        sync()
        t0 = time.perf_counter()
        if rank == 0:
            send_weights(bridge, 0, named, version=version, bucket_bytes=256 << 20)
        else:
            stats = SyncStats()
            got = [checksum(t) for _, t in receive_weights(bridge, version=version, stats=stats)]
            ok = ok and got == sums
            buffers = max(buffers, stats.buffers_allocated)
        sync()
        bridge.barrier()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    q.put((rank, size, best, ok, bridge.backend, buffers))


def bridge_check(tiny: bool) -> None:
    import multiprocessing as mp
    import socket

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device_type = "cuda" if gpus >= 2 else "cpu"
    if gpus == 1:
        emit(bench="weight_sync_bridge", note="one GPU: NCCL refuses two ranks on one device; "
                                               "measuring the gloo bridge from GPU tensors (host copies) instead")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mb, repeats = (16, 2) if tiny else (2048, 3)
    procs = [ctx.Process(target=_bridge_rank, args=(r, port, device_type, gpus, mb, repeats, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    _, nbytes, _, _, backend, _ = res[0]
    seconds = max(r[2] for r in res)
    emit(bench="weight_sync_bridge", transport=backend, tensors_on="cuda" if gpus else "cpu", bytes=nbytes,
         seconds=round(seconds, 4), gb_per_s=round(nbytes / seconds / 1e9, 2), exact=res[1][3],
         receive_buffers_allocated_max=res[1][5],
         note="tulu.dist.weight_sync send_weights -> receive_weights, 1 leader + 1 receiver, 256 MB buckets; best of "
              f"{repeats}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--bridge", action="store_true", help="only the weight-sync bridge check (2 processes)")
    args = ap.parse_args()
    if args.bridge:
        bridge_check(args.tiny)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import LlamaConfig

    from tulu.models.convert import iter_hf_weights
    from tulu.models.llama import build_gpt_model
    from tulu.dist.weight_sync import _buckets

    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    if gpu:
        torch.cuda.set_device(0)
    ps.initialize_model_parallel(1, 1)
    if args.tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        seq, mb, gen_batch, gen_tokens = 128, 2, 4, 16
    else:  # ~1.1B: docs/design.md section 7's 852M config with a Llama-2-size vocabulary
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
        seq, mb, gen_batch, gen_tokens = 2048, 4, 64, 256
    model = build_gpt_model(cfg, dtype=torch.bfloat16 if gpu else torch.float32, attention="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    # fp32 master weights are what Megatron's mixed-precision optimizer keeps; plain AdamW on the
    # bf16 params is the lighter stand-in here (the FLOPs are the model's, not the optimizer's).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    dev = torch.device("cuda" if gpu else "cpu")
    tokens = torch.randint(0, cfg.vocab_size, (mb, seq), device=dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(mb, -1)
    labels = torch.roll(tokens, -1, dims=1)

    def step():
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tps = mb * seq / dt
    peak = 989e12
    emit(bench="megatron_train_step", params=n_params, seq=seq, micro_batch=mb, step_s=round(dt, 4),
         tokens_per_s=round(tps), mfu=round(6 * n_params * tps / peak, 4), peak_tflops=989,
         max_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None)

    bucket = 256 << 20
    for attempt in range(2):  # the first pass includes lazy allocations
        sync()
        t0 = time.perf_counter()
        nbytes, nb = 0, 0
        buf = None
        for b in _buckets(iter_hf_weights(model, cfg), bucket):
            size = sum(t.numel() for _, t in b)
            if buf is None or buf.numel() < size or buf.dtype != b[0][1].dtype:
                buf = torch.empty(max(size, bucket // b[0][1].element_size()), dtype=b[0][1].dtype, device=dev)
            off = 0
            for _, t in b:
                buf[off:off + t.numel()].copy_(t.reshape(-1))
                off += t.numel()
            nbytes += off * buf.element_size()
            nb += 1
        sync()
        dt = time.perf_counter() - t0
    emit(bench="weight_sync_gather_and_bucket", bytes=nbytes, buckets=nb, seconds=round(dt, 4),
         gb_per_s=round(nbytes / dt / 1e9, 2), note="TP=1: no gather; Megatron->HF mapping + bucket packing")

    from transformers import LlamaForCausalLM

    from tulu.data.tokenizer import save_tiny_tokenizer
    from tulu.inference.engine import SamplingSettings
    from tulu.inference.hf_engine import TransformersEngine

    with tempfile.TemporaryDirectory() as d:
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16 if gpu else torch.float32)
        hf.save_pretrained(d)
        save_tiny_tokenizer(d)
        del hf
        eng = TransformersEngine(d, seed=0)
        prompts = [[5 + (i * 7 + j) % 200 for j in range(32)] for i in range(gen_batch)]
        s = SamplingSettings(temperature=1.0, max_new_tokens=gen_tokens, seed=0, stop_token_ids=(10**9,))
        eng.generate(prompts[:2], n=1, sampling=SamplingSettings(temperature=1.0, max_new_tokens=4, seed=0))
        sync()
        t0 = time.perf_counter()
        outs = eng.generate(prompts, n=1, sampling=s)
        sync()
        dt = time.perf_counter() - t0
        new = sum(len(o.token_ids) for o in outs)
        emit(bench="transformers_engine_generate", batch=gen_batch, new_tokens=new, seconds=round(dt, 3),
             tokens_per_s=round(new / dt))
        eng.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
