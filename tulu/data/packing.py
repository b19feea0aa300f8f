"""Packing several samples into one fixed-length row, and the attention mask that keeps them apart.

A packed row keeps its documents visible to the model through two tensors the loader returns:
``position_ids`` restart at 0 at each document, and ``document_ids`` number the documents in the
row (0, 1, ...; -1 on padding). An attention kernel that takes variable-length sequences gets its
boundaries from ``position_ids == 0`` (cumulative lengths = where they restart); others can use
:func:`block_causal_mask`. Labels need no care at boundaries: a document starts with a prompt
token (label -100), so a next-token loss never trains one document to predict the next.
"""

from __future__ import annotations

from typing import Sequence

import torch


def plan_packs(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group positions ``0..len(lengths)-1`` into packs of at most ``max_length`` tokens.

    Next-fit, in the given order: a pack is closed when the next sample does not fit. Order is
    kept, so a packed epoch reads the samples in the same order as a padded one.
    """
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        n = int(n)
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length {max_length}")
        if current and used + n > max_length:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] document ids -> [B, 1, L, L] bool mask, True where query i may attend to key j.

    A token sees earlier tokens of its own document only; padding (-1) sees only itself, so no
    softmax row is empty.
    """
    d = document_ids
    length = d.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=d.device).tril()
    same_doc = (d[:, :, None] == d[:, None, :]) & (d[:, :, None] >= 0)
    eye = torch.eye(length, dtype=torch.bool, device=d.device)
    return ((same_doc & causal) | eye)[:, None]
