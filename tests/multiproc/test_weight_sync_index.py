"""The learner's up-front index: every pipeline stage announces its whole [name, shape, dtype]
list before the first bucket, computed from its shards without a gather, so engines check (and
size) the update before any bytes arrive."""

from __future__ import annotations

import torch

from tests.dist_helpers import free_port, run_distributed
from tulu.dist.groups import BridgeGroup
from tulu.dist.weight_sync import SyncStats, receive_weights, send_weights


def _tp2_pp2(rank, world_size):
    from megatron.core import parallel_state as ps

    from tulu.models.convert import hf_weight_index, iter_hf_weights
    from tulu.models.llama import build_gpt_model, tiny_llama_config

    cfg = tiny_llama_config(vocab_size=255, num_hidden_layers=4)   # TP2 pads the vocabulary to 256
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    model = build_gpt_model(cfg)
    index = hf_weight_index(model, cfg)
    streamed = [[n, list(t.shape), str(t.dtype)] for n, t in iter_hf_weights(model, cfg)]
    views = list(iter_hf_weights(model, cfg, copy=False))
    same = all(n == m and torch.equal(a, b) for (n, a), (m, b) in zip(iter_hf_weights(model, cfg), views))
    return {"index": index, "streamed": streamed, "views_equal": same and len(views) == len(streamed)}


def test_each_stage_index_is_what_its_stream_yields_at_tp2_pp2():
    res = run_distributed(_tp2_pp2, 4, timeout=180)
    for r in res:
        assert r["index"] == r["streamed"]
        assert r["views_equal"]  # copy=False (the weight sync) yields the same tensors
    names = {n for r in res for n, _, _ in r["index"]}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert any(n == "lm_head.weight" and s[0] == 255 for r in res for n, s, _ in r["index"])


def _tp1_views(rank, world_size):
    from megatron.core import parallel_state as ps

    from tulu.models.convert import iter_hf_weights
    from tulu.models.llama import build_gpt_model, tiny_llama_config

    cfg = tiny_llama_config(vocab_size=255, num_hidden_layers=2)
    ps.initialize_model_parallel(1, 1)
    model = build_gpt_model(cfg)
    params = [p.data_ptr() for p in model.parameters()]
    copies = dict(iter_hf_weights(model, cfg))
    out = {}
    for name, t in iter_hf_weights(model, cfg, copy=False):
        base = t.untyped_storage().data_ptr()
        out[name] = {"equal": torch.equal(t, copies[name]), "view": base in params}
    return out


def test_the_weight_syncs_stream_at_tp1_is_views_of_the_parameters_except_q_k_v():
    got = run_distributed(_tp1_views, 1, timeout=120)[0]
    assert all(x["equal"] for x in got.values())
    views = {n for n, x in got.items() if x["view"]}
    assert views == {n for n in got if not any(k in n for k in ("q_proj", "k_proj", "v_proj"))}


def _tensors():
    g = torch.Generator().manual_seed(1)
    return [(f"model.layers.{i}.mlp.down_proj.weight", torch.randn(16, 8, generator=g)) for i in range(6)]


def _announced(rank, world_size, port):
    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=1, timeout_s=60)
    index = [[n, list(t.shape), str(t.dtype)] for n, t in _tensors()]
    if rank == 0:       # a generator, as iter_hf_weights is, with its index given
        send_weights(bridge, 0, (x for x in _tensors()), version=1, bucket_bytes=1024, index=index)
        return None
    stats = SyncStats()
    stream = receive_weights(bridge, version=1, stats=stats)
    before = stream.announced()
    received_before = stats.bytes
    names = [n for n, _ in stream]
    return {"announced": before, "bytes_before": received_before, "names": names}


def test_a_streamed_stage_with_an_index_is_announced_before_any_bucket():
    res = run_distributed(_announced, 2, free_port(), init_process_group=False, timeout=60)
    expected = [(n, tuple(t.shape)) for n, t in _tensors()]
    assert res[1]["announced"] == expected and res[1]["bytes_before"] == 0
    assert res[1]["names"] == [n for n, _ in expected]
