"""Rotary position embedding for Megatron's attention in three tensor ops each way.

Without Transformer Engine, Megatron applies RoPE unfused (``rope_utils._apply_rotary_pos_emb_bshd``):
per call it takes the cosine and the sine of the whole frequency tensor, casts both, builds
``rotate_half`` with a negation and a concatenation, multiplies, adds and concatenates the empty
"pass-through" part on again, and autograd runs the mirror of all that backward. It is called
twice per layer (query and key). On the 0.9M-parameter CPU learner that was ~8% of an RL step's
forward and backward, for the arithmetic of two multiplies and an add per element.

:func:`install` replaces the name ``apply_rotary_pos_emb`` in ``megatron.core.transformer.attention``
(where the attention calls it) by :func:`apply_rotary_pos_emb`, which computes the same rotation
with :class:`_Rotate` (out = t * cos + rotate_half(t) * sin: one full-width multiply and a
multiply-add per half, and its transpose for the gradient) and takes the cosine and sine of a
frequency tensor once for all the calls that get that same tensor (every layer's query and key in
one forward). Anything else -
packed sequences (``cu_seqlens``), the fused (TE) kernels, interleaved or partial rotary
dimensions, multi-latent attention, ``mscale`` != 1 - goes to Megatron's own function unchanged.
The same code runs on CPU and GPU. ``tests/unit/test_models_rope.py`` checks values and
gradients against Megatron's.
"""

from __future__ import annotations

import torch

from tulu.models.name_patch import NamePatch

__all__ = ["PATCH_TARGET", "apply_rotary_pos_emb", "install", "original"]

#: (module, attribute, parameters relied on): the name the attention calls RoPE by.
PATCH_TARGET = ("megatron.core.transformer.attention", "apply_rotary_pos_emb",
                ("t", "freqs", "config", "cu_seqlens", "mscale", "cp_group"))

_STATE: dict = {"freqs": None, "cos_sin": None}


class _Rotate(torch.autograd.Function):
    """``t * cos + rotate_half(t) * sin`` for ``t`` [..., d], ``cos``/``sin`` broadcastable to it,
    with ``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])``. Backward: the transposed rotation,
    ``g * cos + rotate_half^T(g * sin)`` with ``rotate_half^T(y) = cat(y[..., d/2:], -y[..., :d/2])``.
    ``neg_sin`` is ``-sin``, taken once per frequency tensor (:func:`_cos_sin`)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neg_sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin, neg_sin)
        h = t.shape[-1] // 2
        return _rotate(t, cos, neg_sin[..., :h], sin[..., h:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin, neg_sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        return _rotate(grad, cos, sin[..., h:], neg_sin[..., :h]), None, None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_1: torch.Tensor, sin_2: torch.Tensor) -> torch.Tensor:
    """``x * cos``, then ``x[..., d/2:] * sin_1`` added to the first half and ``x[..., :d/2] * sin_2``
    to the second: the rotation (sin_1 = -sin's first half, sin_2 = sin's second) or its transpose
    (sin's second half, -sin's first). One full-width multiply and two half-width multiply-adds:
    the same values, bit for bit, as a multiply and a multiply-add per half (negation is exact),
    with a third fewer strided passes."""
    h = x.shape[-1] // 2
    out = torch.mul(x, cos)
    if not out.is_contiguous():
        out = out.contiguous()
    out[..., :h].addcmul_(x[..., h:], sin_1)
    out[..., h:].addcmul_(x[..., :h], sin_2)
    return out


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos, sin and -sin of ``freqs`` in ``dtype``, as Megatron casts them; reused while the
    attention passes the same frequency tensor (one forward's layers all get the model's one
    embedding)."""
    if _STATE["freqs"] is not freqs or _STATE["cos_sin"][0].dtype != dtype:
        sin = torch.sin(freqs).to(dtype)
        _STATE["freqs"], _STATE["cos_sin"] = freqs, (torch.cos(freqs).to(dtype), sin, -sin)
    return _STATE["cos_sin"]


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """Megatron's ``apply_rotary_pos_emb`` contract; the plain case (module doc) by :class:`_Rotate`."""
    plain = (cu_seqlens is None and mscale == 1.0 and not config.apply_rope_fusion
             and not config.rotary_interleaved and not config.multi_latent_attention
             and freqs.shape[-1] == t.shape[-1] and t.shape[-1] % 2 == 0 and not freqs.requires_grad)
    if not plain:
        return _PATCH.original()(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    return _Rotate.apply(t, *_cos_sin(freqs, t.dtype))


_PATCH = NamePatch(*PATCH_TARGET, apply_rotary_pos_emb)


def original():
    """Megatron's own function (before or after :func:`install`)."""
    return _PATCH.original()


def install() -> None:
    """Route the attention's RoPE through :func:`apply_rotary_pos_emb` (idempotent)."""
    _PATCH.install()
