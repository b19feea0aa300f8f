"""On the CPU, Megatron's torch AdamW steps with torch's fused kernel (`FusedCPUAdamW`): the same
update as the per-tensor loop, also after loading a state saved without the flag; and the
bridge's per-thread store client lets a sending thread meet the engines while the training
thread blocks on the store."""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import free_port  # noqa: E402
from tulu.dist.groups import BridgeGroup  # noqa: E402
from tulu.train.model import FusedCPUAdamW, _fuse_cpu_adam  # noqa: E402


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(64, 32), (32,), (7, 5)]]


def _steps(opt, params, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_fused_step_is_the_loop_step():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    a, b = _params(0), _params(0)
    loop, fused = torch.optim.AdamW(a, **kw), FusedCPUAdamW(b, **kw)
    _steps(loop, a, 5, 1)
    _steps(fused, b, 5, 1)
    assert [g["fused"] for g in fused.param_groups] == [True] and loop.param_groups[0]["fused"] is None
    for x, y, start in zip(a, b, _params(0)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6) and not torch.allclose(x, start)
    # a state saved by the loop version: its groups say fused=None, and the next step fuses again
    c = _params(0)
    resumed = FusedCPUAdamW(c, **kw)
    with torch.no_grad():
        for x, y in zip(c, a):
            x.copy_(y)
    resumed.load_state_dict(copy.deepcopy(loop.state_dict()))  # its own moments, as from a file
    assert resumed.param_groups[0]["fused"] is None
    _steps(resumed, c, 1, 2)
    _steps(loop, a, 1, 2)
    assert resumed.param_groups[0]["fused"] is True
    for x, y in zip(a, c):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_megatrons_torch_adamw_is_switched_to_the_fused_step_only():
    class Wrapper:  # Megatron's optimizer wrappers hold the torch one as .optimizer
        def __init__(self, opt):
            self.optimizer = opt
    adamw, adam = Wrapper(torch.optim.AdamW(_params(0))), Wrapper(torch.optim.Adam(_params(0)))
    _fuse_cpu_adam(adamw)
    _fuse_cpu_adam(adam)
    assert type(adamw.optimizer) is FusedCPUAdamW and type(adam.optimizer) is torch.optim.Adam


def test_a_thread_with_its_own_store_client_is_not_held_by_a_blocking_get():
    bridge = BridgeGroup("127.0.0.1", free_port(), rank=0, size=1, num_stages=1, timeout_s=20)
    view = bridge.with_own_store()
    got = {}

    def wait():  # the training thread waiting for rollouts
        got["value"] = bridge.store.get("rollouts")
    t = threading.Thread(target=wait)
    t.start()
    t.join(0.2)
    assert t.is_alive()
    view.store.set("weights-index", "x")  # the sending thread is not held behind the blocked get
    assert view.store.get("weights-index") == b"x"
    view.store.set("rollouts", "r")
    t.join(10)
    assert got["value"] == b"r"
    assert view.pg is bridge.pg and view._groups is bridge._groups  # the same transport and groups
