"""RMSNorm for Megatron's local layer spec that also runs under sequence parallelism.

Megatron's local spec falls back to ``WrappedTorchNorm`` (torch's ``RMSNorm``) when Apex is
absent, as on our CPU boxes and our GPU image, and that wrapper asserts ``not
sequence_parallel``. Nothing in the norm itself depends on it: RMSNorm normalises each token on
its own, so a rank holding a slice of the sequence computes exactly its slice of the output.
What sequence parallelism does need is the weight gradient: each TP rank sees only its
tokens, so the weight's gradient is a partial sum that must be summed over the TP group.
Megatron's ``finalize_model_grads`` does that for every parameter marked
``sequence_parallel=True`` (Apex's ``FusedLayerNorm`` and Transformer Engine's norms mark
theirs the same way). :class:`RMSNorm` is torch's norm, built from Megatron's norm arguments
like ``WrappedTorchNorm`` (same parameter, same fp32 dtype, same state-dict key), with that mark.
On a GPU it is torch's norm as it is. On the CPU, where torch has a fused forward kernel but
differentiates the norm as its composite of ~6 ops (a dozen more backward), the forward takes the
fused kernel and the backward is :class:`_RMSNormCPU`'s seven ops: 358-362 -> 316-344 us forward and
backward per norm of a [148, 4, 128] fp32 activation alone; in the 4-layer RL learner's step (nine
norms), 52.6 -> 51.6 ms, alternating step by step in one process.
"""

from __future__ import annotations

import torch

__all__ = ["RMSNorm"]


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm(hidden_size, eps)`` whose weight is marked ``sequence_parallel`` when the
    config uses sequence parallelism (so its gradient is all-reduced over the TP group)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_megatron_norm_kwargs):
        # The same refusals as Megatron's WrappedTorchNorm, minus sequence parallelism.
        assert config.normalization == "RMSNorm", f"RMSNorm built for normalization={config.normalization!r}"
        assert not config.layernorm_zero_centered_gamma, "zero_centered_gamma not supported by torch RMSNorm"
        assert not config.persist_layer_norm, "persist_layer_norm not supported by torch RMSNorm"
        assert not config.memory_efficient_layer_norm, "memory_efficient_layer_norm not supported by torch RMSNorm"
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.weight is None or not torch.is_grad_enabled():
            return super().forward(x)
        return _RMSNormCPU.apply(x, self.weight, self.eps)


class _RMSNormCPU(torch.autograd.Function):
    """``y = x * r * w`` with ``r = rsqrt(mean(x^2) + eps)`` over the last dimension. Backward, in
    fp32 (fp64 for fp64): ``dw = sum(g * x r)`` over the other dimensions,
    ``dx = r * (g w - x r * mean(g w * x r))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
        if eps is None:  # torch's default: the dtype's machine epsilon
            eps = torch.finfo(x.dtype).eps
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dtype = torch.promote_types(x.dtype, torch.float32)
        n = x.shape[-1]
        g, xr = grad.to(dtype), x.to(dtype) * rstd.to(dtype)
        dw = (g * xr).reshape(-1, n).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            gw = g * weight.to(dtype)
            dot = torch.linalg.vecdot(gw, xr).unsqueeze(-1)
            dx = torch.addcmul(gw, xr, dot, value=-1.0 / n).mul_(rstd).to(x.dtype)
        return dx, dw, None
