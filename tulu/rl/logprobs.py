"""Log-probabilities of given tokens, and entropies, from logits: fp32 math, bounded memory.

Both work through the rows of the logits in chunks of ``chunk_size`` positions, each chunk cast to
float32 on its own, and both have a hand-written backward that recomputes the softmax per chunk
from the saved (e.g. bf16) logits. Neither the forward nor the backward holds more than one fp32
``[chunk_size, vocab]`` block (128k vocab × 1,024 positions = 512 MiB) beyond the logits and the
gradient the caller already has. Gradients are exact: for ``x = logits / temperature`` and
``p = softmax(x)``::

    d log p_y / d logits = (onehot(y) - p) / temperature                       (log-softmax)
    d H / d logits       = -p * (x - sum_i p_i x_i) / temperature   with H = logsumexp(x) - sum p x

**Temperature.** vLLM reports the log-probs of the tokens it sampled at temperature ``T``
(log-softmax of ``logits / T``). For the trainer's log-probs to match (the PPO ratio, the KL),
pass the same ``temperature`` here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_logprobs", "selected_logprobs", "entropy_from_logits"]

DEFAULT_CHUNK = 1024


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half/bf16/fp32 logits; float64 stays float64 (for gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _scaled(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``logits / temperature`` in ``dtype`` (a view of the input when nothing changes: T = 1 in
    the input's dtype; callers never write to it)."""
    x = logits.to(dtype)
    return x if temperature == 1.0 else x / temperature


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (vLLM's sampling temperature), got {temperature}")


class _SelectedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, chunk: int) -> Tensor:
        dtype = _compute_dtype(logits)
        out = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for i in range(0, logits.shape[0], chunk):
            x = _scaled(logits[i : i + chunk], dtype, temperature)
            lse[i : i + chunk] = torch.logsumexp(x, dim=-1)
            out[i : i + chunk] = x.gather(-1, labels[i : i + chunk, None]).squeeze(-1) - lse[i : i + chunk]
        ctx.save_for_backward(logits, labels)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # (onehot(y) - p) * g / t, built in the softmax's own buffer: 4 passes over a chunk
        # (scale, softmax, multiply, scatter) and, for a single chunk, no copy into a gradient.
        logits, labels = ctx.saved_tensors
        t, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        n = logits.shape[0]
        grad = torch.empty_like(logits) if n > chunk else None
        for i in range(0, n, chunk):
            g = grad_out[i : i + chunk, None].to(dtype) / t
            d = torch.softmax(_scaled(logits[i : i + chunk], dtype, t), dim=-1)
            d.mul_(-g)
            d.scatter_add_(-1, labels[i : i + chunk, None], g)
            if grad is None:
                return d.to(logits.dtype), None, None, None
            grad[i : i + chunk] = d
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, chunk: int) -> Tensor:
        dtype = _compute_dtype(logits)
        out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for i in range(0, logits.shape[0], chunk):
            x = logits[i : i + chunk].to(dtype) / temperature
            out[i : i + chunk] = torch.special.entr(torch.softmax(x, dim=-1)).sum(-1)  # 0 log 0 = 0
        ctx.save_for_backward(logits)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (logits,) = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)
        dtype = _compute_dtype(logits)
        for i in range(0, logits.shape[0], chunk):
            x = logits[i : i + chunk].to(dtype) / t
            p = torch.softmax(x, dim=-1)
            x = torch.where(p > 0, x, 0.0)  # masked-out vocabulary (-inf logits) has p = 0
            mean_x = (p * x).sum(-1, keepdim=True)
            grad[i : i + chunk] = -p * (x - mean_x) * (grad_out[i : i + chunk, None].to(dtype) / t)
        return grad, None, None


def selected_logprobs(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """``log_softmax(logits / temperature)[..., labels]`` with *no shift*: ``logits[..., i, :]``
    scores ``labels[..., i]``. Shapes ``[..., V]`` and ``[...]``; returns float32 ``[...]``.
    Labels outside ``[0, V)`` (padding such as -100) are clamped; mask those positions out.
    The result is float32 (float64 for float64 logits)."""
    _check_temperature(temperature)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"selected_logprobs: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}"
        )
    vocab = logits.shape[-1]
    safe_labels = labels.reshape(-1).clamp(0, vocab - 1).long()
    flat = _SelectedLogProb.apply(logits.reshape(-1, vocab), safe_labels, float(temperature), chunk_size)
    return flat.view(labels.shape)


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Log-prob of each *next* token: ``out[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])``.

    ``logits [B, T, V]`` from a causal LM run on ``tokens [B, T]`` (``logits[:, t]`` predicts
    ``tokens[:, t+1]``). Returns float32 ``[B, T-1]``, aligned with ``tokens[:, 1:]``: a response
    mask over ``tokens`` is aligned with the result as ``mask[:, 1:]``. The logits are not sliced
    or copied (the last position's label is a dummy whose output is dropped).
    """
    if logits.dim() != 3 or tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            "token_logprobs: need logits [B, T, V] and tokens [B, T], "
            f"got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # last column is a dummy
    return selected_logprobs(logits, labels, temperature, chunk_size=chunk_size)[:, :-1]


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` at every position: ``[..., V]`` ->
    float32 ``[...]``, no shift (to align with :func:`token_logprobs`, take ``[:, :-1]``)."""
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    return _Entropy.apply(logits.reshape(-1, vocab), float(temperature), chunk_size).view(logits.shape[:-1])
