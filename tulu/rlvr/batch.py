"""Rollouts -> a training batch: prompt + response token rows, response masks, scores,
group-normalised advantages, and Megatron micro-batches for one data-parallel rank.

Row layout (right padded to the step's longest sequence L):
  tokens[i]   = prompt ids + response ids + pad
  targets[i]  = tokens shifted left by one (position t predicts token t + 1)
  mask[i, t]  = True where targets[i, t] is a response token
so a per-token log-prob computed at position t belongs to response token t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    sampler_logprobs: list[float]
    finish_reason: str
    dataset: str
    ground_truth: object


@dataclass
class RLBatch:
    tokens: torch.Tensor  # [N, L]
    targets: torch.Tensor  # [N, L]
    mask: torch.Tensor  # [N, L] bool
    sampler_logprobs: torch.Tensor  # [N, L] (0 off the mask)
    scores: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def rows(self, start: int, stop: int) -> "RLBatch":
        return RLBatch(*(getattr(self, f)[start:stop] for f in ("tokens", "targets", "mask", "sampler_logprobs",
                                                                  "scores", "advantages")))


def build_batch(rollouts: list[Rollout], scores: torch.Tensor, advantages: torch.Tensor, pad_id: int,
                multiple: int = 8) -> RLBatch:
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    L = -(-max(lengths) // multiple) * multiple
    n = len(rollouts)
    tokens = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.bool)
    sampler = torch.zeros((n, L), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        p, resp = len(r.prompt_ids), len(r.response_ids)
        tokens[i, :p + resp] = torch.tensor(r.prompt_ids + r.response_ids)
        # target position t holds token t + 1: response tokens sit at targets[p-1 : p-1+resp]
        mask[i, p - 1:p - 1 + resp] = True
        if resp:
            sampler[i, p - 1:p - 1 + resp] = torch.tensor(r.sampler_logprobs[:resp], dtype=torch.float32)
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return RLBatch(tokens, targets, mask, sampler, scores.float(), advantages.float())


def micro_batches(batch: RLBatch, micro_size: int, *, response_logits_only: bool = False) -> list[dict]:
    """Megatron micro-batches of ``micro_size`` rows. ``response_logits_only``: the per-token
    tensors (targets, mask, sampler log-probs) start at the micro-batch's first response target
    (``mb["logits_from"]``), and the model must produce logits from there on only
    (`tulu.rlvr.objective.run_logits_schedule` does): prompt positions carry no loss, so their
    logits are not worth computing."""
    n = batch.tokens.shape[0]
    if n % micro_size:
        raise ValueError(f"{n} rollouts on this rank do not split into micro-batches of {micro_size}")
    out = []
    for s in range(0, n, micro_size):
        part = batch.rows(s, s + micro_size)
        L = part.tokens.shape[1]
        start = 0
        if response_logits_only:
            cols = part.mask.any(dim=0).nonzero()
            start = int(cols[0]) if len(cols) else L - 1
        out.append({"tokens": part.tokens, "targets": part.targets[:, start:], "mask": part.mask[:, start:],
                    "position_ids": torch.arange(L).unsqueeze(0).expand(micro_size, L),
                    "attention_mask": None, "advantages": part.advantages,
                    "sampler_logprobs": part.sampler_logprobs[:, start:], "logits_from": start})
    return out
