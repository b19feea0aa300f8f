"""Capture and restore every random number generator a training step draws from.

Python's ``random``, NumPy's global generator, torch's CPU generator, every CUDA device's
generator (when CUDA is initialised) and Megatron's model-parallel RNG tracker (the
per-TP-rank streams used for dropout inside tensor-parallel regions). States are per rank:
restore them on the same rank of the same layout for an exact resume.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def _megatron_tracker(import_if_needed: bool = False):
    """Megatron's RNG tracker, or None. Not imported just to look: a run that never imported
    Megatron has no tracker state to save."""
    name = "megatron.core.tensor_parallel.random"
    if name not in sys.modules and not import_if_needed:
        return None
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except ImportError:
        return None
    return get_cuda_rng_tracker()


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_tracker()
    if tracker is not None:
        states = tracker.get_states()
        if states:
            state["megatron_tracker"] = {k: v.clone() for k, v in states.items()}
    return state


def restore_rng_state(state: dict[str, Any]) -> list[str]:
    """Restore what ``state`` holds; returns the names of generators that could not be
    restored here (e.g. CUDA states saved on GPUs, restored on a CPU-only host)."""
    skipped = []
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(state["torch_cuda"]):
            torch.cuda.set_rng_state_all(state["torch_cuda"])
        else:
            skipped.append("torch_cuda")
    if "megatron_tracker" in state:
        tracker = _megatron_tracker(import_if_needed=True)
        if tracker is None:
            skipped.append("megatron_tracker")
        else:
            tracker.set_states(state["megatron_tracker"])
    return skipped
