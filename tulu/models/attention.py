"""Core attention for Megatron's local layer spec computed by torch SDPA.

Megatron-core's local spec (no Transformer Engine) computes attention unfused: a [b*h, s, s]
score matrix, a softmax, a second matmul. On an H200 that ran at 35k tokens/s and 49 GiB for an
852M Llama where SDPA (flash / memory-efficient kernels) ran at 66k tokens/s and 24 GiB
(docs/design.md section 7). ``tulu.models.llama.build_gpt_model`` puts ``SDPAttention`` in the spec.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

__all__ = ["SDPAttention", "additive_mask"]

_ADDITIVE: dict = {}


def additive_mask(masked_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Megatron's boolean mask (True = masked out) as SDPA's additive one: 0 where attended,
    -inf where not, in ``dtype``. SDPA converts a boolean mask so itself (``where``), on every call
    and again in its backward; every layer gets the same mask tensor, so it is converted once per
    mask here, for all layers and both passes (values and gradients unchanged, bit for bit). The
    one cached conversion is dropped with its mask, or replaced by the next mask's."""
    key = _ADDITIVE.get("key")
    if key is not None and key[0]() is masked_out and key[1:] == (masked_out._version, dtype):
        return _ADDITIVE["value"]
    value = torch.zeros(masked_out.shape, dtype=dtype, device=masked_out.device)
    value.masked_fill_(masked_out, float("-inf"))
    ref = weakref.ref(masked_out, _drop_additive)
    _ADDITIVE.update(key=(ref, masked_out._version, dtype), value=value)
    return value


def _drop_additive(ref) -> None:
    if _ADDITIVE.get("key", (None,))[0] is ref:
        _ADDITIVE.clear()


class SDPAttention(DotProductAttention):
    """Megatron core attention computed by ``torch.nn.functional.scaled_dot_product_attention``.

    A drop-in for the local spec's ``DotProductAttention`` (same constructor, same
    [s, b, heads, dim] -> [s, b, heads*dim] contract): causal or an explicit boolean mask
    (Megatron's convention: True = masked out), GQA without repeating K/V, attention dropout
    in training. Not supported (asserted): packed sequences, attention bias, sliding windows,
    non-vanilla softmax.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "SDPAttention does not support packed sequences"
        assert attention_bias is None, "SDPAttention does not support attention bias"
        assert self.config.window_size is None, "SDPAttention does not support sliding windows"
        assert self.softmax_offset is None, "SDPAttention supports only the vanilla softmax"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else additive_mask(attention_mask, q.dtype)
        if is_causal and sq != sk:  # causal over the last sq keys (bottom-right aligned)
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            is_causal = False
        dropout_p = self.attention_dropout.p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout_p > 0 and not self.config.sequence_parallel else nullcontext())
        with rng:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, h, s, d] -> [s, b, h*d]
        ctx = ctx.permute(2, 0, 1, 3).contiguous()
        return ctx.view(ctx.shape[0], ctx.shape[1], self.hidden_size_per_partition)
