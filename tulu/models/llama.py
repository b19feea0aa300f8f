"""Llama (3.x) as a Megatron-core ``GPTModel``, built from a Hugging Face ``LlamaConfig``.

The model uses Megatron's local layer spec (no Transformer Engine): RMSNorm, SwiGLU MLP
(``linear_fc1`` = [gate; up]), RoPE with Llama 3.1 frequency scaling, grouped-query attention,
untied embeddings. Its core attention is torch SDPA by default (``SDPAttention``; Megatron's
local unfused attention is ~2x slower on a GPU and is kept as ``attention="unfused"``).

The model is built for the calling process's place in Megatron's ``parallel_state``: its
tensor-parallel shard and its pipeline stage (``pre_process`` on the first stage, the layers of
this stage, ``post_process`` on the last). Call ``parallel_state.initialize_model_parallel``
first. Layers are split over the stages as ``tulu.plan.layout.layers_per_stage`` says (the one source
of the split: the memory plan reads it too); an uneven split (126 layers in 10 stages: 11,
13 x 8, 11) reaches Megatron as ``num_layers_in_{first,last}_pipeline_stage``, and Megatron
numbers each layer globally from it (``layer_number``), which the HF name mapping, weight sync
and checkpoints use. The norms are ``tulu.models.norm.RMSNorm`` (torch's, usable under
sequence parallelism) wherever Megatron's local spec would pick its torch norm.
On a CPU-only torch the CUDA redirects of :mod:`tulu.models.megatron_cpu` are applied and
parameters are fp32; on a GPU they are bf16.

The attention applies RoPE through ``tulu.models.rope`` (installed here): Megatron's unfused
rotation in three ops each way (the same rotation; a result may differ from Megatron's in its last bit).

``LLAMA_PRESETS`` holds the shapes of the real Llama 3.1 models (no weights): the memory planner
reads them; ``tiny_llama_config`` makes a test-sized config.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tulu.models import megatron_cpu
from tulu.models import rope as rope_patch
from tulu.models import swiglu as swiglu_patch
from tulu.models.presets import LLAMA_PRESETS

__all__ = [
    "LLAMA_PRESETS",
    "build_gpt_model",
    "pipeline_split_settings",
    "llama_config_from_preset",
    "padded_vocab_size",
    "rope_settings",
    "tiny_llama_config",
    "transformer_config_from_hf",
]

def llama_config_from_preset(name: str, **overrides: Any):
    """A ``LlamaConfig`` with the shapes of ``LLAMA_PRESETS[name]`` (no weights involved)."""
    from transformers import LlamaConfig

    if name not in LLAMA_PRESETS:
        raise KeyError(f"unknown Llama preset {name!r}; known: {', '.join(sorted(LLAMA_PRESETS))}")
    return LlamaConfig(**{**LLAMA_PRESETS[name], **overrides})


def tiny_llama_config(
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    rope_scaling: bool = False,
    max_position_embeddings: int = 512,
    **overrides: Any,
):
    """A test-sized ``LlamaConfig`` (GQA, untied). ``rope_scaling=True`` turns on Llama 3.1
    frequency scaling with an original context short enough that it changes short sequences."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    )
    if rope_scaling:
        kwargs["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
        }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def rope_settings(hf_config) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling dict or None) from a LlamaConfig of transformers 4.x or 5.x."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or params or None
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported; only the default RoPE and Llama 3.x "
            "'llama3' scaling are (rope_scaling/rope_parameters in the HF config)"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {k: float(scaling[k]) for k in keys}


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 1) -> int:
    """The embedding rows Megatron holds: ``vocab_size`` rounded up to ``tp_size * multiple``.
    Llama 3's 128256 needs no padding for any power-of-two TP up to 256."""
    step = tp_size * multiple
    return int(math.ceil(vocab_size / step) * step)


def pipeline_split_settings(num_layers: int, pp: int) -> dict[str, int]:
    """``TransformerConfig`` settings that make Megatron build ``tulu.plan.layout.layers_per_stage``'s
    split: none when it is even, else the first and last stages' layer counts (Megatron spreads
    the rest evenly over the middle stages, which is how the plan splits too)."""
    from tulu.plan.layout import layers_per_stage

    split = layers_per_stage(num_layers, pp)
    if len(set(split)) == 1:
        return {}
    first, *middle, last = split
    if len(set(middle)) > 1:  # Megatron's uneven mode cannot express it: refuse, never guess
        raise ValueError(f"pipeline split {split} of {num_layers} layers over PP={pp} has uneven middle "
                         "stages; Megatron's num_layers_in_{first,last}_pipeline_stage cannot build it")
    return {"num_layers_in_first_pipeline_stage": first, "num_layers_in_last_pipeline_stage": last}


def transformer_config_from_hf(hf_config, *, dtype: torch.dtype | None = None, **overrides):
    """A Megatron ``TransformerConfig`` for ``hf_config`` at the current TP/PP sizes, with the
    plan's pipeline split (:func:`pipeline_split_settings`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    if getattr(hf_config, "tie_word_embeddings", False):
        raise NotImplementedError(
            "tie_word_embeddings=True (Llama 3.2 1B/3B) is not supported yet: the converters "
            "assume separate embedding and output weights"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"Llama uses SwiGLU (hidden_act='silu'), got {hf_config.hidden_act!r}")
    on_gpu = torch.cuda.is_available()
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(hf_config, "attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=hf_config.initializer_range,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(pipeline_split_settings(hf_config.num_hidden_layers,
                                          ps.get_pipeline_model_parallel_world_size()))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    hf_config,
    *,
    dtype: torch.dtype | None = None,
    attention: str = "sdpa",
    vocab_multiple: int = 1,
    seed: int = 1234,
    **config_overrides: Any,
):
    """This process's shard of a Megatron ``GPTModel`` with the architecture of ``hf_config``.

    ``attention``: "sdpa" (torch ``scaled_dot_product_attention``) or "unfused" (Megatron's
    local ``DotProductAttention``). ``vocab_multiple``: pad the vocabulary to a multiple of
    ``tp_size * vocab_multiple``. ``config_overrides`` go to ``TransformerConfig`` (e.g.
    ``recompute_granularity``). Weights are randomly initialised; load real ones with
    ``tulu.models.convert.hf_state_dict_to_megatron``.

    Megatron's model-parallel RNG tracker (dropout streams; the unfused attention forks it on
    every call) is seeded with ``seed`` via ``model_parallel_cuda_manual_seed`` unless the
    caller has done so already.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if megatron_cpu.apply():
        # the MLP's SwiGLU in one autograd node (tulu.models.swiglu) instead of Megatron's op-by-op glu
        swiglu_patch.install()
        config_overrides.setdefault("bias_activation_fusion", True)
    rope_patch.install()
    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "build_gpt_model needs Megatron's parallel state: call "
            "megatron.core.parallel_state.initialize_model_parallel(tp, pp) first"
        )
    from megatron.core import tensor_parallel

    if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = transformer_config_from_hf(hf_config, dtype=dtype, **config_overrides)
    theta, scaling = rope_settings(hf_config)
    tp = ps.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=_block_spec(config, attention),
        vocab_size=padded_vocab_size(hf_config.vocab_size, tp, vocab_multiple),
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rotary_percent=1.0,
    )
    if torch.cuda.is_available():
        # Megatron's torch norms are created on the CPU; Megatron-LM moves the model after build.
        model.cuda(torch.cuda.current_device())
    if scaling is not None:
        # Megatron's own rope_scaling takes only `factor` (low/high/original fixed at 1/4/8192);
        # apply HF's full llama3 formula (Megatron's _apply_scaling is the same code).
        rope = model.rotary_pos_emb
        rope.inv_freq = rope._apply_scaling(rope.inv_freq, **{
            "factor": scaling["factor"],
            "low_freq_factor": scaling["low_freq_factor"],
            "high_freq_factor": scaling["high_freq_factor"],
            "original_max_position_embeddings": scaling["original_max_position_embeddings"],
        })
    return model


def _block_spec(config, attention: str):
    """The decoder's spec: Megatron's local layer spec with our core attention and, where that
    spec would use Megatron's torch norm (``WrappedTorchNorm``: no Apex; it refuses sequence
    parallelism), :class:`tulu.models.norm.RMSNorm` for the layers' and the final norm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from tulu.models.norm import RMSNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "sdpa":
        from tulu.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention != "unfused":
        raise ValueError(f"attention must be 'sdpa' or 'unfused', got {attention!r}")
    layer = spec.submodules
    if layer.input_layernorm is not WrappedTorchNorm:  # Apex's fused norm: handles SP itself
        return spec
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    # Megatron picks the final norm by itself (``LayerNormImpl``) for a layer spec; a block spec
    # names it, with this stage's layer count (the plan's split, via the config).
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)
