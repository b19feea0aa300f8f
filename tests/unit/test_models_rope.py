"""tulu.models.rope: the attention's RoPE in three ops gives Megatron's values and gradients, and
hands every case it does not take to Megatron's own function."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

pytest.importorskip("megatron.core")

from megatron.core.models.common.embeddings import rope_utils  # noqa: E402

from tulu.models import rope  # noqa: E402


def _config(**over):
    base = dict(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    return SimpleNamespace(**{**base, **over})


def _freqs(s: int, d: int, batch: int = 1, theta: float = 10000.0, dtype=torch.float32):
    """Megatron's layout: [s, b, 1, d], the d/2 frequencies twice (cat(freqs, freqs)); with
    batch > 1, each sequence has its own positions (the shared-prompt layout's)."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.stack([torch.randperm(s) for _ in range(batch)], 1).double()  # [s, b]
    f = pos[..., None] * inv  # [s, b, d/2]
    return torch.cat([f, f], -1)[:, :, None].to(dtype)


def test_the_patch_target_has_the_parameters_relied_on():
    module, name, params = rope.PATCH_TARGET
    got = tuple(inspect.signature(rope.original()).parameters)
    assert got[: len(params)] == params, f"{module}.{name} now takes {got}"
    assert rope.original() is rope_utils.apply_rotary_pos_emb


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_and_gradients_match_megatron(batch, dtype):
    torch.manual_seed(batch)
    s, b, h, d = 7, 3, 4, 16
    t = torch.randn(s, b, h, d, dtype=dtype, requires_grad=True)
    freqs = _freqs(s, d, batch)
    ours = rope.apply_rotary_pos_emb(t, freqs, _config())
    theirs = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    grad = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, t, grad)
    (g_theirs,) = torch.autograd.grad(theirs, t, grad)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(g_ours, g_theirs, rtol=tol, atol=tol)


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    t = torch.randn(5, 2, 2, 8, dtype=torch.float64, requires_grad=True)
    freqs = _freqs(5, 8, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: rope.apply_rotary_pos_emb(x, freqs, _config()), (t,))


def test_cos_and_sin_are_taken_once_per_frequency_tensor():
    freqs = _freqs(6, 8)
    t = torch.randn(6, 2, 2, 8)
    rope.apply_rotary_pos_emb(t, freqs, _config())
    first = rope._STATE["cos_sin"]
    rope.apply_rotary_pos_emb(t, freqs, _config())
    assert rope._STATE["cos_sin"] is first
    other = freqs.clone()
    rope.apply_rotary_pos_emb(t, other, _config())
    assert rope._STATE["cos_sin"] is not first and rope._STATE["freqs"] is other


@pytest.mark.parametrize("case", ["cu_seqlens", "mscale", "interleaved", "partial"])
def test_what_it_does_not_take_goes_to_megatron(case, monkeypatch):
    calls = []

    def megatron(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        calls.append(case)
        return t

    monkeypatch.setattr(rope._PATCH, "_original", megatron)
    t = torch.randn(4, 1, 2, 8)
    freqs = _freqs(4, 8)
    kwargs, config = {}, _config()
    if case == "cu_seqlens":
        kwargs["cu_seqlens"] = torch.tensor([0, 4])
    elif case == "mscale":
        kwargs["mscale"] = 0.5
    elif case == "interleaved":
        config = _config(rotary_interleaved=True)
    else:
        freqs = freqs[..., :4]
    assert rope.apply_rotary_pos_emb(t, freqs, config, **kwargs) is t
    assert calls == [case]


def test_install_routes_the_attention_through_it_once():
    from megatron.core.transformer import attention

    rope.install()
    rope.install()
    assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
    assert rope.original() is rope_utils.apply_rotary_pos_emb


def _per_half(x, cos, sin, sign):
    """The four-op form this replaced: a multiply and a multiply-add on each half."""
    h = x.shape[-1] // 2
    out = torch.empty_like(x)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1)
    o1.addcmul_(x2, sin[..., h:] if sign < 0 else sin[..., :h], value=-sign)
    torch.mul(x2, cos[..., h:], out=o2)
    o2.addcmul_(x1, sin[..., :h] if sign < 0 else sin[..., h:], value=sign)
    return out


@pytest.mark.parametrize("heads", [4, 2])
def test_the_rotation_equals_the_four_op_form_bit_for_bit(heads):
    """Three ops (a full-width multiply, then a multiply-add per half with -sin folded in) give
    the four-op form's values exactly, both ways (negation is exact)."""
    torch.manual_seed(heads)
    s, b, d = 11, 3, 16
    h = d // 2
    x = torch.randn(s, b, heads, d)
    cos, sin, neg_sin = rope._cos_sin(_freqs(s, d, b), torch.float32)
    assert torch.equal(rope._rotate(x, cos, neg_sin[..., :h], sin[..., h:]), _per_half(x, cos, sin, 1.0))
    assert torch.equal(rope._rotate(x, cos, sin[..., h:], neg_sin[..., :h]), _per_half(x, cos, sin, -1.0))
