"""Rollout generation: the :class:`InferenceEngine` interface and its two backends.

``make_engine("vllm" | "transformers", model_dir, ...)`` is the only place the backend is chosen;
vLLM is imported only when it is asked for. See :mod:`tulu.inference.engine` for the contract.
"""

from tulu.inference.engine import (
    ENGINE_KINDS,
    Completion,
    InferenceEngine,
    SamplingSettings,
    WeightUpdateError,
    make_engine,
    read_weight_shapes,
)

__all__ = [
    "ENGINE_KINDS",
    "Completion",
    "InferenceEngine",
    "SamplingSettings",
    "WeightUpdateError",
    "make_engine",
    "read_weight_shapes",
]
