"""tulu.models.swiglu: the MLP's SwiGLU in one autograd node gives the values and gradients of
Megatron's op-by-op glu bit for bit, and hands the cases it does not take to Megatron's function."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

pytest.importorskip("megatron.core")

from megatron.core.fusions import fused_bias_swiglu  # noqa: E402

from tulu.models import swiglu  # noqa: E402


def _megatron_glu(x, offset: float = 0.0):
    """Megatron's unfused path (mlp.MLP.forward's glu, activation silu, no clamp)."""
    x_glu, x_linear = torch.chunk(x, 2, dim=-1)
    return F.silu(x_glu) * (x_linear + offset)


def test_the_patch_target_has_the_parameters_relied_on():
    module, name, params = swiglu.PATCH_TARGET
    got = tuple(inspect.signature(swiglu.original()).parameters)
    assert got[: len(params)] == params, f"{module}.{name} now takes {got}"
    assert swiglu.original() is fused_bias_swiglu.bias_swiglu_impl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3, 20), (5, 12)])
def test_values_and_gradients_equal_the_unfused_glu_bit_for_bit(dtype, shape):
    torch.manual_seed(len(shape))
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    ours, theirs = swiglu.swiglu(x), _megatron_glu(x)
    grad = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_theirs,) = torch.autograd.grad(theirs, x, grad)
    assert ours.shape == theirs.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(ours, theirs)
    assert torch.equal(g_ours, g_theirs)
    assert g_ours.is_contiguous()


def test_gradcheck():
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu.swiglu, (x,))


def test_a_strided_input_and_gradient_are_handled():
    base = torch.randn(6, 4, 10, requires_grad=True)
    x = base.transpose(0, 1)  # [4, 6, 10], not contiguous
    out = swiglu.swiglu(x)
    grad = torch.randn(6, 4, 5).transpose(0, 1)
    (g_ours,) = torch.autograd.grad(out, base, grad)
    (g_theirs,) = torch.autograd.grad(_megatron_glu(x), base, grad)
    assert torch.equal(out, _megatron_glu(x))
    assert torch.equal(g_ours, g_theirs)


def test_an_odd_width_is_refused():
    with pytest.raises(ValueError, match="even"):
        swiglu.swiglu(torch.randn(2, 5))


def test_bias_fp8_and_offload_go_to_megatron(monkeypatch):
    calls = []
    monkeypatch.setattr(swiglu._PATCH, "_original", lambda *a: calls.append(a) or "megatron")
    x = torch.randn(4, 6)
    assert swiglu.bias_swiglu_impl(x, torch.zeros(6)) == "megatron"
    assert swiglu.bias_swiglu_impl(x, None, True) == "megatron"
    assert swiglu.bias_swiglu_impl(x, None, False, True) == "megatron"
    assert len(calls) == 3
    assert torch.equal(swiglu.bias_swiglu_impl(x, None), _megatron_glu(x))


def test_install_routes_the_mlp_and_is_idempotent():
    from megatron.core.transformer import mlp

    swiglu.install()
    swiglu.install()
    assert mlp.bias_swiglu_impl is swiglu.bias_swiglu_impl
    assert swiglu.original() is fused_bias_swiglu.bias_swiglu_impl
