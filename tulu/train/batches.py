"""Loader batches -> Megatron micro-batches.

The loader's rows carry labels at the same positions as the tokens (Hugging Face style). A
Megatron ``GPTModel`` given ``labels`` scores position ``t``'s logits against ``labels[t]``, so
the targets here are the labels shifted left by one: ``targets[t] = labels[t + 1]``; the last
position and every ignored label (-100) get target 0 and ``loss_mask`` False.

Packed rows get a block-causal mask (a token sees earlier tokens of its own document only), in
Megatron's convention (True = masked out). RoPE in Megatron's GPTModel ignores ``position_ids``
and numbers positions across the row; inside one document, attention with RoPE depends only on
the distance between positions, so with the block mask this equals restarting at each document.

Preference batches hold ``P`` chosen rows followed by their ``P`` rejected partners; a DPO
micro-batch keeps that shape: its ``m`` chosen rows, then the same ``m`` pairs' rejected rows.
"""

from __future__ import annotations

import torch

from tulu.data.chat import IGNORE_INDEX
from tulu.data.packing import block_causal_mask


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, loss_mask) for next-token prediction from same-position labels ``[B, T]``."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return torch.where(mask, shifted, torch.zeros_like(shifted)), mask


def micro_batch(batch: dict[str, torch.Tensor], rows: torch.Tensor, packed: bool) -> dict:
    targets, loss_mask = next_token_targets(batch["labels"][rows])
    mb = {
        "tokens": batch["tokens"][rows],
        "position_ids": batch["position_ids"][rows],
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": ~block_causal_mask(batch["document_ids"][rows]) if packed else None,
        "real_tokens": int(batch["attention_mask"][rows].sum()),
    }
    return mb


def to_device(mb: dict, device: torch.device) -> dict:
    """The micro-batch's tensors on the model's device (a no-op on CPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def split_sft(batch: dict[str, torch.Tensor], num_micro: int, packed: bool) -> list[dict]:
    rows = batch["tokens"].shape[0]
    if rows % num_micro:
        raise ValueError(f"{rows} rows do not split into {num_micro} micro-batches")
    m = rows // num_micro
    return [micro_batch(batch, torch.arange(i * m, (i + 1) * m), packed) for i in range(num_micro)]


def split_pairs(batch: dict[str, torch.Tensor], num_micro: int) -> list[dict]:
    pairs = batch["tokens"].shape[0] // 2
    if pairs % num_micro:
        raise ValueError(f"{pairs} pairs do not split into {num_micro} micro-batches")
    m = pairs // num_micro
    out = []
    for i in range(num_micro):
        chosen = torch.arange(i * m, (i + 1) * m)
        mb = micro_batch(batch, torch.cat([chosen, chosen + pairs]), packed=False)
        mb["pairs"] = m
        out.append(mb)
    return out
