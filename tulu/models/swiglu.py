"""SwiGLU for Megatron's MLP on the CPU in one autograd node: no split, offset add or concatenation.

Megatron's local MLP computes the gated activation op by op (``mlp.MLP.forward``'s ``glu``):
``chunk`` the fc1 output, ``silu`` the first half (a strided read), add ``glu_linear_offset`` (0.0
for Llama) to the second half, multiply; autograd then runs the mirror of each and joins the two
halves' gradients with a ``cat``. On the 0.9M-parameter CPU learner that was ~1 ms of an RL step.

With ``bias_activation_fusion`` the MLP instead calls the name ``bias_swiglu_impl`` (Megatron's
fused kernel, ``torch.compile``d - a C++ build on first use on a CPU). :func:`install` replaces
that name in ``megatron.core.transformer.mlp`` by :func:`bias_swiglu_impl`, and
``tulu.models.llama.build_gpt_model`` turns the fusion on where it installs this (CPU only).
:class:`_SwiGLU` computes ``silu(a) * b`` forward and writes both halves' gradients straight into
one buffer backward; its values and gradients equal the unfused ops' bit for bit (the same
kernels: ``silu``, ``mul``, ``silu_backward``). The biased, fp8-stored and CPU-offloaded variants
go to Megatron's own function. ``tests/unit/test_models_swiglu.py`` checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tulu.models.name_patch import NamePatch

__all__ = ["PATCH_TARGET", "bias_swiglu_impl", "install", "original", "swiglu"]

#: (module, attribute, parameters relied on): the name the MLP calls the fused SwiGLU by.
PATCH_TARGET = ("megatron.core.transformer.mlp", "bias_swiglu_impl",
                ("input", "bias", "fp8_input_store", "cpu_offload_input"))


class _SwiGLU(torch.autograd.Function):
    """``silu(x[..., :h]) * x[..., h:]``. Saves ``x`` (the fc1 output, alive anyway while the
    graph holds it) and ``silu(x1)``; backward: ``[silu'(x1) * g * x2, g * silu(x1)]`` in one buffer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        a = F.silu(x1)
        ctx.save_for_backward(x, a)
        return a * x2

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a = ctx.saved_tensors
        x1, x2 = x.chunk(2, dim=-1)
        h = x1.shape[-1]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.mul(grad, a, out=out[..., h:])
        torch.ops.aten.silu_backward.grad_input(grad * x2, x1, grad_input=out[..., :h])
        return out


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of ``x`` [..., 2h] -> [..., h] (gate first, as Megatron's fc1 lays it out)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension must be even (gate and linear halves), got {x.shape[-1]}")
    return _SwiGLU.apply(x)


def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):  # noqa: A002 - Megatron's name
    """Megatron's ``bias_swiglu_impl`` contract; without bias, fp8 storage or offloading by
    :func:`swiglu`, anything else by Megatron's own function."""
    if bias is not None or fp8_input_store or cpu_offload_input:
        return _PATCH.original()(input, bias, fp8_input_store, cpu_offload_input)
    return swiglu(input)


_PATCH = NamePatch(*PATCH_TARGET, bias_swiglu_impl)


def original():
    """Megatron's own function (before or after :func:`install`)."""
    return _PATCH.original()


def install() -> None:
    """Route the MLP's fused SwiGLU through :func:`bias_swiglu_impl` (idempotent)."""
    _PATCH.install()
