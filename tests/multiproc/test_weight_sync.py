"""Bucketed weight sync over a real bridge: pipeline-stage leaders + inference ranks."""

import torch

from tests.dist_helpers import free_port, run_distributed
from tulu.distributed import BridgeGroup
from tulu.weight_sync import SyncStats, receive_weights, send_weights


def _stage_tensors(stage: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(stage)
    out = [(f"model.layers.{stage * 2 + i}.mlp.down_proj.weight", torch.randn(64, 48, generator=g)) for i in range(2)]
    out.append((f"model.layers.{stage * 2}.input_layernorm.weight", torch.randn(64, generator=g).to(torch.bfloat16)))
    if stage == 1:
        out.append(("lm_head.weight", torch.randn(300, 64, generator=g)))
        out.append(("model.norm.weight", torch.randn(64, 48, generator=g)[:, 0]))   # not contiguous
    return out


def _sync(rank, world_size, port, bucket_bytes):
    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=2, timeout_s=60)
    if rank < 2:
        # stage 0 sends a list (its index is announced up front), stage 1 a generator (it is not)
        named = _stage_tensors(rank) if rank == 0 else iter(_stage_tensors(rank))
        st = send_weights(bridge, rank, named, version=1, bucket_bytes=bucket_bytes)
        return {"buckets": st.buckets, "copied": st.copied_bytes}
    stats = SyncStats()
    expected = dict(_stage_tensors(0) + _stage_tensors(1))
    names, exact = [], []
    stream = receive_weights(bridge, version=1, stats=stats, bucket_bytes=bucket_bytes)
    announced = [stream._stage_index(s) is not None for s in range(2)]
    for name, t in stream:
        names.append(name)
        exact.append(t.dtype == expected[name].dtype and torch.equal(t, expected[name]))
    return {"names": names, "exact": exact, "buckets": stats.buckets, "announced": announced,
            "tensors": stats.tensors}


def test_inference_ranks_receive_every_stage_tensor_exactly_in_buckets():
    port = free_port()
    res = run_distributed(_sync, 4, port, 20_000, init_process_group=False, timeout=120)
    for r in (2, 3):
        assert res[r]["names"] == [n for n, _ in _stage_tensors(0) + _stage_tensors(1)]
        assert all(res[r]["exact"])
        assert res[r]["announced"] == [True, False]
        assert res[r]["tensors"] == 8
    # 20 kB buckets: contiguous tensors of a quarter bucket or more (the 12 kB matrices, the 77 kB
    # lm_head) go alone, from their own memory; the tiny bf16 vector too (nothing to pack it with);
    # only the strided norm (64 floats) is copied into a bucket buffer.
    assert res[0]["buckets"] == 3 and res[1]["buckets"] == 5
    assert res[0]["copied"] == 0 and res[1]["copied"] == 64 * 4
    assert res[2]["buckets"] == 8
