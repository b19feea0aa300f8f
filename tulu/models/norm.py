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
It works unchanged on CPU and GPU: there is no GPU-only branch.
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
