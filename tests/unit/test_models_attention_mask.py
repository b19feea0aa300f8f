"""tulu.models.attention.additive_mask: Megatron's boolean mask converted once for every layer
gives SDPA's own conversion's values and gradients bit for bit, and is never served stale."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

pytest.importorskip("megatron.core")

from tulu.models import attention  # noqa: E402


def _mask(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    masked_out = torch.rand(b, 1, s, s, generator=g) > 0.5
    masked_out &= ~torch.eye(s, dtype=torch.bool)  # every query sees itself
    return masked_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sdpa_with_it_equals_sdpa_with_the_boolean_mask(dtype):
    torch.manual_seed(0)
    b, h, kv, s, d = 2, 4, 2, 19, 8
    q = torch.randn(b, h, s, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, kv, s, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, kv, s, d, dtype=dtype, requires_grad=True)
    masked_out = _mask(b, s, 1)
    grad = torch.randn(b, h, s, d, dtype=dtype)
    outs = []
    for mask in (~masked_out, attention.additive_mask(masked_out, dtype)):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        outs.append((o, *torch.autograd.grad(o, (q, k, v), grad)))
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


def test_one_conversion_per_mask_and_never_stale():
    m = _mask(1, 5, 2)
    first = attention.additive_mask(m, torch.float32)
    assert attention.additive_mask(m, torch.float32) is first  # every layer: the same tensor
    assert attention.additive_mask(m, torch.float64) is not first  # another dtype: converted again
    assert attention.additive_mask(m, torch.float64).dtype == torch.float64
    m[0, 0, 0, 0] = not bool(m[0, 0, 0, 0])  # changed in place: converted again
    again = attention.additive_mask(m, torch.float32)
    assert again is not first
    assert torch.equal(again == float("-inf"), m)
    other = _mask(1, 5, 3)
    assert torch.equal(attention.additive_mask(other, torch.float32) == 0, ~other)


def test_the_conversion_is_dropped_with_its_mask():
    m = _mask(1, 6, 4)
    attention.additive_mask(m, torch.float32)
    assert attention._ADDITIVE
    del m
    gc.collect()
    assert not attention._ADDITIVE
