"""Bucketed weight sync over a real bridge: pipeline-stage leaders + inference ranks."""

import pytest
import torch

from tests.dist_helpers import free_port, run_distributed
from tulu.dist.groups import BridgeGroup
from tulu.dist.weight_sync import SyncStats, receive_weights, send_weights


def _stage_tensors(stage: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(stage)
    out = [(f"model.layers.{stage * 2 + i}.mlp.down_proj.weight", torch.randn(64, 48, generator=g)) for i in range(2)]
    out.append((f"model.layers.{stage * 2}.input_layernorm.weight", torch.randn(64, generator=g).to(torch.bfloat16)))
    if stage == 1:
        out.append(("lm_head.weight", torch.randn(300, 64, generator=g)))
        out.append(("model.norm.weight", torch.randn(64, 48, generator=g)[:, 0]))   # not contiguous
    return out


def _sync(rank, world_size, port, bucket_bytes, streams):
    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=2, timeout_s=60)
    if rank < 2:
        # stage 0 sends a list (its index is announced up front), stage 1 a generator (it is not)
        named = _stage_tensors(rank) if rank == 0 else iter(_stage_tensors(rank))
        st = send_weights(bridge, rank, named, version=1, bucket_bytes=bucket_bytes)
        return {"buckets": st.buckets, "copied": st.copied_bytes, "inline": st.inline_tensors}
    stats = SyncStats()
    expected = dict(_stage_tensors(0) + _stage_tensors(1))
    names, exact = [], []
    stream = receive_weights(bridge, version=1, stats=stats, bucket_bytes=bucket_bytes, streams=streams)
    announced = [stream._stage_index(s) is not None for s in range(2)]
    for name, t in stream:
        names.append(name)
        exact.append(t.dtype == expected[name].dtype and torch.equal(t, expected[name]))
    return {"names": names, "exact": exact, "buckets": stats.buckets, "announced": announced,
            "tensors": stats.tensors, "inline": stats.inline_tensors}


@pytest.mark.parametrize("streams", [1, 2])
def test_inference_ranks_receive_every_stage_tensor_exactly_in_buckets(streams):
    port = free_port()
    res = run_distributed(_sync, 4, port, 20_000, streams, init_process_group=False, timeout=120)
    stage0, stage1 = ([n for n, _ in _stage_tensors(s)] for s in (0, 1))
    for r in (2, 3):
        if streams == 1:            # one stage after the other
            assert res[r]["names"] == stage0 + stage1
        else:                       # both at once: interleaved, each stage in its own order
            assert sorted(res[r]["names"]) == sorted(stage0 + stage1)
            assert [n for n in res[r]["names"] if n in stage0] == stage0
            assert [n for n in res[r]["names"] if n in stage1] == stage1
        assert all(res[r]["exact"])
        assert res[r]["announced"] == [True, False]
        assert res[r]["tensors"] == 8
    # 20 kB buckets: contiguous tensors of a quarter bucket or more (the 12 kB matrices, the 77 kB
    # lm_head) go alone, from their own memory; buckets of a 64th of that or less (the 128 B bf16
    # vector, the strided 256 B norm) ride in the next bucket's metadata (or, last, alone in the
    # store): nothing is copied into a bucket buffer.
    assert res[0]["buckets"] == 2 and res[1]["buckets"] == 3
    assert res[0]["inline"] == 1 and res[1]["inline"] == 2
    assert res[0]["copied"] == 0 and res[1]["copied"] == 0
    assert res[2]["buckets"] == 5 and res[2]["inline"] == 3


def _model_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = [("model.embed_tokens.weight", torch.randn(40, 16, generator=g))]
    for i in range(4):
        out += [(f"model.layers.{i}.input_layernorm.weight", torch.randn(16, generator=g)),
                (f"model.layers.{i}.mlp.down_proj.weight", torch.randn(16, 32, generator=g))]
    out += [("model.norm.weight", torch.randn(16, generator=g)), ("lm_head.weight", torch.randn(40, 16, generator=g))]
    return out


def _routed(rank, world_size, port):
    from tulu.inference.engine import CheckedWeights
    from tulu.dist.weight_sync import HeldWeights

    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=1, timeout_s=60)
    if rank == 0:
        st = send_weights(bridge, 0, iter(_model_tensors()), version=1, bucket_bytes=4096)
        return {"bytes": st.bytes}
    holds = {1: HeldWeights(first_layer=0, end_layer=2, embedding=True, head=False),   # inference PP stage 0
             2: HeldWeights(first_layer=2, end_layer=4, embedding=False, head=True),   # inference PP stage 1
             3: None}[rank]                                                            # an unsplit engine
    stats = SyncStats()
    stream = receive_weights(bridge, version=1, stats=stats, holds=holds)
    expected = {n: tuple(t.shape) for n, t in _model_tensors()}
    checked = CheckedWeights(stream, expected, where=f"rank {rank}")
    sent = dict(_model_tensors())
    got = {n: torch.equal(t, sent[n]) for n, t in checked}
    return {"names": sorted(got), "exact": all(got.values()), "error": checked.error, "bytes": stats.bytes}


def test_routed_sync_gives_each_inference_rank_only_the_tensors_it_holds():
    res = run_distributed(_routed, 4, free_port(), init_process_group=False, timeout=120)
    every = sorted(n for n, _ in _model_tensors())
    stage0 = sorted(["model.embed_tokens.weight"] + [n for n in every if n.startswith(("model.layers.0.", "model.layers.1."))])
    stage1 = sorted(["model.norm.weight", "lm_head.weight"] + [n for n in every if n.startswith(("model.layers.2.", "model.layers.3."))])
    assert res[1]["names"] == stage0 and res[2]["names"] == stage1 and res[3]["names"] == every
    for r in (1, 2, 3):
        # the engine-side check expects only what the rank holds: nothing reported missing
        assert res[r]["exact"] and res[r]["error"] is None
    assert res[1]["bytes"] + res[2]["bytes"] == res[3]["bytes"] == res[0]["bytes"]


NODES = {1: "a", 2: "a", 3: "b", 4: "b"}   # bridge rank -> simulated node


def _fanned(rank, world_size, port):
    from tulu.dist.weight_sync import HeldWeights

    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=1, timeout_s=60, node=NODES.get(rank, "t"))
    stage0 = HeldWeights(first_layer=0, end_layer=2, embedding=True, head=False)
    stage1 = HeldWeights(first_layer=2, end_layer=4, embedding=False, head=True)
    out = {}
    for version in (1, 2):
        if rank == 0:
            st = send_weights(bridge, 0, _model_tensors(), version=version, bucket_bytes=4096)
            out[version] = {"bytes": st.bytes, "sent": st.sent_bytes, "wire": st.bytes - st.inline_bytes}
            continue
        # v1: every receiver holds everything; v2: node a is an engine's PP stage 0 (TP2), node b its stage 1
        holds = None if version == 1 else (stage0 if NODES[rank] == "a" else stage1)
        stats = SyncStats()
        sent = dict(_model_tensors())
        got = {n: torch.equal(t, sent[n]) for n, t in receive_weights(bridge, version=version, stats=stats, holds=holds)}
        out[version] = {"names": sorted(got), "exact": all(got.values()), "bytes": stats.bytes,
                        "relayed": stats.relayed_bytes, "wire": stats.bytes - stats.inline_bytes}
    return out


def test_a_node_gets_each_bucket_once_and_passes_it_on_to_its_other_receivers():
    res = run_distributed(_fanned, 5, free_port(), init_process_group=False, timeout=120)
    every = sorted(n for n, _ in _model_tensors())
    total, wire = res[0][1]["bytes"], res[0][1]["wire"]     # wire: not carried in the store (the norms)
    assert 0 < wire < total
    # unrouted: both nodes need everything; the leader sends it once per node, not once per rank
    assert res[0][1]["sent"] == 2 * wire
    for r in (1, 2, 3, 4):
        assert res[r][1]["names"] == every and res[r][1]["exact"] and res[r][1]["bytes"] == total
    # the first receiver of each node passes each bucket on to the other one
    assert [res[r][1]["relayed"] for r in (1, 2, 3, 4)] == [wire, 0, wire, 0]
    # routed + fanned out: each stage's bytes cross to one node, once; both ranks there get them
    assert res[0][2]["sent"] == res[0][2]["wire"] == wire
    assert res[1][2]["names"] == res[2][2]["names"] != res[3][2]["names"] == res[4][2]["names"]
    assert res[1][2]["bytes"] + res[3][2]["bytes"] == total
    assert all(res[r][2]["exact"] for r in (1, 2, 3, 4))
    assert [res[r][2]["relayed"] for r in (1, 2, 3, 4)] == [res[1][2]["wire"], 0, res[3][2]["wire"], 0]


def _mixed_transports(rank, world_size, port):
    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=1, timeout_s=60)
    bridge.stage_group(0)
    if rank == 1:
        bridge.backend = "nccl"     # as a receiver made with device="cuda" says
        receive_weights(bridge, version=1)
        return None
    try:
        send_weights(bridge, 0, _model_tensors(), version=1)
    except RuntimeError as e:
        return str(e)
    return None


def test_a_leader_refuses_receivers_on_another_transport_before_sending():
    res = run_distributed(_mixed_transports, 2, free_port(), init_process_group=False, timeout=60)
    assert "sends over gloo, but bridge rank(s) [1] receive over ['nccl']" in res[0]


def _slow_stage0(rank, world_size, port):
    import time

    from tulu.dist.weight_sync import HeldWeights

    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=2, timeout_s=60)
    model = _model_tensors()
    stages = [[x for x in model if not x[0].startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))],
              [x for x in model if x[0].startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))]]
    if rank < 2:
        def slow(named):            # stage 0's gather takes 3 s before its first tensor
            if rank == 0:
                time.sleep(3.0)
            yield from named
        index = [[n, list(t.shape), str(t.dtype)] for n, t in stages[rank]]
        send_weights(bridge, rank, slow(stages[rank]), version=1, bucket_bytes=4096, index=index)
        return time.monotonic()
    holds = (HeldWeights(first_layer=2, end_layer=4, embedding=False, head=True) if rank == 2 else   # engine PP 1
             HeldWeights(first_layer=0, end_layer=2, embedding=True, head=False))                   # engine PP 0
    names = sorted(n for n, _ in receive_weights(bridge, version=1, holds=holds))
    return {"names": names, "done": time.monotonic()}


def test_an_engine_stage_does_not_wait_for_training_stages_that_hold_none_of_its_layers():
    res = run_distributed(_slow_stage0, 4, free_port(), init_process_group=False, timeout=120)
    stage0_done = res[0]
    assert res[2]["names"] == sorted(["model.layers.2.input_layernorm.weight", "model.layers.2.mlp.down_proj.weight",
                                      "model.layers.3.input_layernorm.weight", "model.layers.3.mlp.down_proj.weight",
                                      "model.norm.weight", "lm_head.weight"])
    assert res[2]["done"] < stage0_done - 1.5         # it finished while stage 0 was still gathering
    assert res[3]["done"] > stage0_done - 0.5         # engine PP 0 needed stage 0
    assert len(res[2]["names"]) + len(res[3]["names"]) == len(_model_tensors())


def _stages_at_once(rank, world_size, port, streams, timeout_s):
    """Stage 0's leader sends one tensor, then waits until stage 1's whole sync is done: only a
    receiver that takes both stages at once lets that happen."""
    nodes = {2: "a", 3: "a", 4: "b", 5: "b"}
    bridge = BridgeGroup("127.0.0.1", port, rank, world_size, num_stages=2, timeout_s=timeout_s, node=nodes.get(rank))
    if rank == 0:
        def held_back():
            tensors = _stage_tensors(0)
            yield tensors[0]
            bridge.store.wait(["stage1-done"])
            yield from tensors[1:]
        try:
            send_weights(bridge, 0, held_back(), version=1, bucket_bytes=4096)
            bridge.store.wait([f"got{r}" for r in range(2, world_size)])   # it serves the store
        except Exception as e:      # the store's wait timed out: stage 1 never finished
            return type(e).__name__
        return "sent"
    if rank == 1:
        try:
            st = send_weights(bridge, 1, _stage_tensors(1), version=1, bucket_bytes=4096)
        except Exception as e:      # its receivers never came to stage 1
            return type(e).__name__
        bridge.store.set("stage1-done", "1")
        return st.sent_bytes
    stats = SyncStats()
    expected = dict(_stage_tensors(0) + _stage_tensors(1))
    try:
        exact = all(torch.equal(t, expected[n]) for n, t in
                    receive_weights(bridge, version=1, stats=stats, streams=streams))
    except Exception as e:
        return type(e).__name__
    bridge.store.set(f"got{rank}", "1")
    return {"exact": exact, "relayed": stats.relayed_bytes, "tensors": stats.tensors}


def test_a_receiver_takes_its_stages_at_once_each_through_another_node_head():
    res = run_distributed(_stages_at_once, 6, free_port(), 2, 20, init_process_group=False, timeout=120)
    assert res[0] == "sent"
    assert all(res[r]["exact"] and res[r]["tensors"] == 8 for r in (2, 3, 4, 5))
    # stage 0 enters each node through its first receiver, stage 1 through its second: each
    # relays one stage's bytes (on a GPU node: two NICs busy instead of one)
    relayed = [res[r]["relayed"] for r in (2, 3, 4, 5)]
    assert relayed[0] == relayed[2] > 0 and relayed[1] == relayed[3] > 0
    assert relayed[1] == res[1] / 2          # stage 1's wire bytes: sent to two nodes, relayed in each


def test_one_stream_at_a_time_cannot_take_a_stage_that_waits_on_the_next():
    """The test above can fail: with one stream, stage 1 waits behind stage 0, which waits on it."""
    res = run_distributed(_stages_at_once, 6, free_port(), 1, 6, init_process_group=False, timeout=120)
    assert res[0] != "sent" and res[1] == "DistStoreError"
    assert all(isinstance(res[r], str) for r in (2, 3, 4, 5))   # timed out, not received
