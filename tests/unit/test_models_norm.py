"""tulu.models.norm.RMSNorm: on the CPU its fused forward and hand-written backward give torch's
values and gradients; without gradients, and on a GPU, it is torch's norm unchanged."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tulu.models.norm import RMSNorm, _RMSNormCPU  # noqa: E402


def _norm(hidden: int, dtype=torch.float32, sequence_parallel: bool = False) -> RMSNorm:
    cfg = SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=False, persist_layer_norm=False,
                          memory_efficient_layer_norm=False, sequence_parallel=sequence_parallel)
    norm = RMSNorm(cfg, hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_and_gradients_match_torch(dtype):
    torch.manual_seed(0)
    norm = _norm(32, dtype)
    x = torch.randn(7, 3, 32, dtype=dtype, requires_grad=True)
    g = torch.randn(7, 3, 32, dtype=dtype)
    y = norm(x)
    assert y.grad_fn.name().endswith("_RMSNormCPUBackward")
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    ref = torch.nn.functional.rms_norm(x, [32], norm.weight, 1e-5)
    rx, rw = torch.autograd.grad(ref, (x, norm.weight), g)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, rx, rtol=tol, atol=tol)
    torch.testing.assert_close(gw, rw, rtol=tol, atol=tol)
    assert gx.dtype == gw.dtype == dtype


def test_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(4, 2, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormCPU.apply(a, b, 1e-5), (x, w))


def test_without_gradients_it_is_torchs_norm_and_the_mark_stays():
    norm = _norm(16, sequence_parallel=True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        y = norm(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, [16], norm.weight, 1e-5))
    assert norm.weight.sequence_parallel is True
