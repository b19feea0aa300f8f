"""Training throughput: tulu.train (Megatron-core GPTModel, DDP wrapper, Megatron's Adam with
clipping, the pipeline schedule) at TP=1/DP=2 vs plain PyTorch (transformers LlamaForCausalLM +
torch.optim.AdamW + torch DDP) on the same tiny Llama, the same global batch, in the same run.

Two gloo processes per side (CPU) or NCCL (GPU). Prints one JSON line per figure: tokens/s of
each side and their ratio. Not an assertion about speed: CI runs ``--quick`` so it cannot rot.

    .venv/bin/python bench/bench_train.py            # hidden 256, 4 layers, seq 256, 10 steps
    .venv/bin/python bench/bench_train.py --quick    # hidden 64, 2 layers, seq 64, 4 steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "quick": dict(hidden=64, ffn=176, layers=2, heads=4, kv=2, seq=64, micro=8, num_micro=2, steps=4, warmup=1),
    "full": dict(hidden=256, ffn=704, layers=4, heads=8, kv=4, seq=256, micro=8, num_micro=2, steps=10, warmup=2),
}
VOCAB = 512
DP = 2


def _config(s: dict) -> dict:
    return {
        "stage": "sft", "mode": "train",
        "cluster": {"executor": "local", "nodes": 1, "gpus_per_node": DP},
        "groups": {"training": {"tp": 1, "pp": 1, "dp": DP, "distributed_optimizer": False,
                                "micro_batch_size": s["micro"]}},
        "model": {"dtype": "fp32", "tiny": {"vocab_size": VOCAB, "hidden_size": s["hidden"],
                                            "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"],
                                            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"],
                                            "max_position_embeddings": s["seq"]}},
        "sft": {"optim": {"lr": 1.0e-3, "grad_clip": 1.0}, "global_batch_size": s["micro"] * s["num_micro"] * DP,
                "max_seq_len": s["seq"], "packing": False},
        "run": {"seed": 0},
    }


def _batch(s: dict, rank: int) -> dict[str, torch.Tensor]:
    """This rank's rows: random tokens, every position trained (a full-length SFT batch)."""
    g = torch.Generator().manual_seed(100 + rank)
    rows = s["micro"] * s["num_micro"]
    tokens = torch.randint(5, VOCAB, (rows, s["seq"]), generator=g)
    return {"tokens": tokens, "labels": tokens.clone(), "position_ids": torch.arange(s["seq"]).expand(rows, -1).clone(),
            "document_ids": torch.zeros_like(tokens), "attention_mask": torch.ones_like(tokens),
            "loss_mask": torch.ones_like(tokens, dtype=torch.bool)}


def _timed(step, s: dict) -> float:
    for _ in range(s["warmup"]):
        step()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    dist.barrier()
    return time.perf_counter() - t


def _megatron(rank: int, s: dict) -> dict:
    from megatron.core import parallel_state as ps

    from tulu.config.job import config_from_dict
    from tulu.models import megatron_cpu
    from tulu.train import batches
    from tulu.train.model import build_policy, resolve_model
    from tulu.train.objectives import SFTObjective
    from tulu.train.step import train_step

    megatron_cpu.apply()
    ps.initialize_model_parallel(1, 1)
    cfg = config_from_dict(_config(s))
    policy = build_policy(cfg, resolve_model(cfg.model, 0))
    objective = SFTObjective(cfg.sft, s["seq"], s["num_micro"])
    mbs = batches.split_sft(_batch(s, rank), s["num_micro"], packed=False)
    elapsed = _timed(lambda: train_step(policy, mbs, objective.loss_fn, lr=1e-3, seq_length=s["seq"]), s)
    params = sum(p.numel() for p in policy.module.parameters())
    ps.destroy_model_parallel()
    return {"elapsed": elapsed, "params": params}


def _pytorch(rank: int, s: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaForCausalLM

    from tulu.config.job import config_from_dict
    from tulu.train.model import resolve_model

    cfg = config_from_dict(_config(s))
    torch.manual_seed(0)
    model = LlamaForCausalLM(resolve_model(cfg.model, 0).hf_config)
    model.config._attn_implementation = "sdpa"
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    batch = _batch(s, rank)
    m = s["micro"]

    def step():
        opt.zero_grad(set_to_none=True)
        for i in range(s["num_micro"]):
            rows = slice(i * m, (i + 1) * m)
            with ddp.no_sync() if i < s["num_micro"] - 1 else torch.enable_grad():
                out = ddp(input_ids=batch["tokens"][rows], labels=batch["labels"][rows])
                (out.loss / s["num_micro"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    elapsed = _timed(step, s)
    return {"elapsed": elapsed, "params": sum(p.numel() for p in model.parameters())}


def _worker(rank: int, side: str, s: dict, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(DP))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // DP))
    dist.init_process_group("gloo", rank=rank, world_size=DP, timeout=timedelta(seconds=300))
    try:
        result = (_megatron if side == "megatron" else _pytorch)(rank, s)
        if rank == 0:
            out.put(result)
    finally:
        dist.destroy_process_group()


def _run(side: str, s: dict) -> dict:
    import socket

    with socket.socket() as sock:  # a free port for this side's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_worker, args=(side, s, port, q), nprocs=DP, start_method="spawn", join=True)
    return q.get(timeout=10)


def _emit(figure: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"bench": "train", "figure": figure, "value": round(value, 3), "unit": unit, **extra}),
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smallest size, for CI")
    args = p.parse_args(argv)
    s = SIZES["quick" if args.quick else "full"]
    tokens_per_step = s["micro"] * s["num_micro"] * DP * s["seq"]
    shape = {k: s[k] for k in ("hidden", "layers", "seq", "steps")} | {"global_batch": s["micro"] * s["num_micro"] * DP,
                                                                        "device": "cpu", "dp": DP, "tp": 1}
    rates = {}
    for side in ("megatron", "pytorch"):
        r = _run(side, s)
        rates[side] = tokens_per_step * s["steps"] / r["elapsed"]
        _emit(f"{side}_tokens_per_s", rates[side], "tokens/s", params=r["params"],
              impl="tulu.train (Megatron-core)" if side == "megatron" else "transformers + AdamW + torch DDP", **shape)
    _emit("megatron_over_pytorch", rates["megatron"] / rates["pytorch"], "ratio", **shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
