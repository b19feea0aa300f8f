"""`Problem`: one generated task item, and the hash that puts it in the train or held-out split."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

HELDOUT_PER_MILLE = 200
"""About a fifth of all problems are held out."""


@dataclass(frozen=True, slots=True)
class Problem:
    """``key`` names the problem without its wording (template, names, topic phrasing), so a
    held-out problem is new to the model, not a rephrasing of one it trained on. ``answer`` is the
    SFT target; ``ground_truth`` is what the verifier checks a completion against. ``slip`` is the
    answer of a careless teacher, one the verifier rejects (see `tulu.data.tasks.sft_rows`)."""

    key: str
    prompt: str
    answer: str
    ground_truth: str
    slip: str


@functools.lru_cache(maxsize=1 << 16)  # keys repeat: ~2k problems per task
def is_heldout(task: str, key: str) -> bool:
    """Whether the problem ``key`` of ``task`` belongs to the held-out split (a pure function of the
    two strings, so every seed, process and Python version agrees)."""
    digest = hashlib.sha256(f"{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE
