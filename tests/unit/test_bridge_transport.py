"""The bridge's transport is chosen by device, once: NCCL between GPU tensors, gloo between host
buffers. Only the choice and the gloo side run here (no GPU); the NCCL groups run on a GPU node
(bench/gpu_check.py --bridge)."""

import pytest
import torch
import torch.distributed as dist

from tests.dist_helpers import free_port
from tulu.dist.groups import BridgeGroup, bridge_backend, bridge_device_type
from tulu.dist.weight_sync import _buckets, _fan_out, _sendable_as_is


def test_a_task_with_a_gpu_on_a_cuda_build_gets_a_cuda_bridge():
    assert bridge_device_type(1, visible="0,1,2,3", cuda_built=True) == "cuda"
    assert bridge_device_type(0, visible="5", cuda_built=True) == "cuda"


def test_no_visible_gpu_or_a_cpu_build_gets_a_host_bridge():
    assert bridge_device_type(0, visible="", cuda_built=True) == "cpu"
    # the local Slurm's fake GPUs on the CPU build of torch
    assert bridge_device_type(0, visible="0,1,2,3,4,5,6,7", cuda_built=False) == "cpu"


def test_the_transport_follows_the_device():
    assert bridge_backend("cuda") == "nccl" and bridge_backend("cpu") == "gloo"
    with pytest.raises(ValueError, match="expected 'cuda' or 'cpu'"):
        bridge_backend("xpu")


def test_a_host_bridge_moves_buckets_over_gloo_groups():
    bridge = BridgeGroup("127.0.0.1", free_port(), 0, 1, num_stages=1, timeout_s=30, device="cpu")
    assert bridge.backend == "gloo" and bridge.device == torch.device("cpu")
    pg, my = bridge.group((0,))
    assert isinstance(pg, dist.ProcessGroupGloo) and my == 0
    assert bridge.stage_group(0) == (pg, 0)          # the same members: the same group, made once


@pytest.mark.skipif(dist.is_nccl_available(), reason="this torch has NCCL")
def test_a_cuda_bridge_without_nccl_is_refused_with_what_to_do():
    with pytest.raises(RuntimeError, match="needs NCCL.*device='cpu'"):
        BridgeGroup("127.0.0.1", free_port(), 0, 1, num_stages=1, timeout_s=30, device="cuda")


def test_a_tensor_is_sent_from_its_own_memory_only_on_the_bridge_device():
    host = torch.zeros(1 << 20, dtype=torch.uint8)
    other = torch.empty(1 << 20, dtype=torch.uint8, device="meta")   # stands in for a GPU tensor
    assert _sendable_as_is(host, torch.device("cpu")) and not _sendable_as_is(other, torch.device("cpu"))
    assert _sendable_as_is(other, torch.device("meta")) and not _sendable_as_is(host, torch.device("meta"))
    # off the bridge's device, a large tensor is packed with its neighbours (copied to the device)
    named = [("a", host[:4096]), ("b", host[4096:8192])]
    assert [len(b) for b in _buckets(named, 16384, alone_bytes=4096)] == [1, 1]
    assert [len(b) for b in _buckets(named, 16384, alone_bytes=4096, device=torch.device("meta"))] == [2]


def test_each_node_has_one_head_that_takes_the_bucket_for_the_rest_of_its_node():
    nodes = {2: 0, 3: 0, 4: 1, 5: 1, 6: 2}
    assert _fan_out((2, 3, 4, 5, 6), nodes) == {2: (3,), 4: (5,), 6: ()}
    assert _fan_out((3, 5), nodes) == {3: (), 5: ()}
    assert _fan_out((), nodes) == {}
