"""Reductions over the tokens a mask selects (response tokens), ignoring padding entirely.

Every helper uses ``torch.where`` rather than multiplying by the mask, so whatever sits in a
padded position (garbage, ``inf``, ``NaN``) cannot leak into the result. Masks may be bool or
0/1 numbers of the same shape as ``x`` (or broadcastable to it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set (over ``dim``, or over everything)."""
    kept = torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """How many positions ``mask`` selects (as a float tensor)."""
    m = _bool(mask).to(torch.float32)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the selected positions; 0 where nothing is selected (never NaN)."""
    total = masked_sum(x, mask, dim)
    count = masked_count(mask.expand_as(x) if mask.shape != x.shape else mask, dim)
    return total / count.clamp(min=1.0).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all selected positions (Bessel-corrected when ``unbiased``,
    as TRL's and OpenRLHF's ``masked_var``); 0 when fewer than two positions are selected."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_count(mask.expand_as(x) if mask.shape != x.shape else mask)
        var = var * (n / (n - 1).clamp(min=1.0)).to(var.dtype)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and variance over the selected positions
    only; padded positions come back as 0. ``shift_mean=False`` scales without centring (the
    mean is added back), as TRL's ``masked_whiten`` does for rewards."""
    m = _bool(mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))
