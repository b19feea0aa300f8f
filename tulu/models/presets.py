"""Shapes of the Llama 3.1 models (from the HF releases' config.json; no weights).

Pure data, cheap to import: the memory planner reads it. ``tulu.models.llama`` turns a preset into
a ``LlamaConfig`` (``llama_config_from_preset``) and re-exports ``LLAMA_PRESETS``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLAMA_PRESETS"]

_LLAMA31_COMMON: dict[str, Any] = {
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "head_dim": 128,
}
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "llama3.1-8b": {**_LLAMA31_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama3.1-70b": {**_LLAMA31_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                     "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama3.1-405b": {**_LLAMA31_COMMON, "hidden_size": 16384, "intermediate_size": 53248,
                      "num_hidden_layers": 126, "num_attention_heads": 128,
                      "num_key_value_heads": 8},
}


