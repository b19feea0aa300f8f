"""Advantages: GRPO's group-normalised scores and PPO's generalised advantage estimation (GAE).

Layout conventions (shared by all of ``tulu.rl``):

- per-sequence tensors are ``[N]``; per-token tensors are ``[N, T]`` with a ``mask`` of the same
  shape that selects response tokens (prompt and padding are 0; holes are allowed);
- GRPO groups are contiguous, prompt-major: ``[p0s0, p0s1, …, p0s(k-1), p1s0, …]``, the order in
  which vLLM returns ``n=k`` samples per prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tulu.rl.masked import masked_whiten

__all__ = ["grpo_advantages", "per_token", "gae_advantages", "whiten_advantages"]


def grpo_advantages(
    rewards: Tensor, samples_per_prompt: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-normalised advantages, one per sequence: ``(r - mean_group) / (std_group + eps)``.

    GRPO, Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300) §4.1.2 "outcome supervision"; the std
    is the Bessel-corrected sample std, as in TRL's ``GRPOTrainer`` and open-instruct.
    ``scale_by_std=False`` gives Dr. GRPO's ``r - mean_group`` (Liu et al. 2025, "Understanding
    R1-Zero-Like Training", arXiv:2503.20783 §3.1), which avoids up-weighting groups whose
    rewards barely differ. A group of equal rewards gets exactly 0 (no NaN).

    ``rewards``: ``[num_prompts * samples_per_prompt]``, grouped as described in the module doc.
    Returns a float32 tensor of the same shape; broadcast it to tokens with :func:`per_token`.
    """
    if rewards.dim() != 1:
        raise ValueError(
            f"grpo_advantages: rewards must be 1-D [num_prompts * samples], got {tuple(rewards.shape)}"
        )
    if samples_per_prompt < 2:
        raise ValueError(
            f"grpo_advantages: samples_per_prompt={samples_per_prompt}; group normalisation needs at "
            "least 2 samples per prompt (set rl.samples_per_prompt >= 2, or use PPO with a value model)"
        )
    if rewards.numel() % samples_per_prompt:
        raise ValueError(
            f"grpo_advantages: {rewards.numel()} rewards is not a multiple of "
            f"samples_per_prompt={samples_per_prompt}; every prompt needs all its samples"
        )
    groups = rewards.float().view(-1, samples_per_prompt)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def per_token(values: Tensor, mask: Tensor) -> Tensor:
    """Broadcast per-sequence ``values [N]`` to every response token: ``[N, T]``, 0 off the mask."""
    m = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(m, values[:, None].to(torch.float32), torch.zeros((), device=values.device))


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens; returns ``(advantages, returns)``.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (arXiv:1506.02438),
    eq. 16 with the recursion of PPO (Schulman et al. 2017, arXiv:1707.06347, eq. 11–12)::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}        returns_t = A_t + V_t

    with ``V`` and ``A`` after the last response token taken as 0 (the episode ends there).
    ``rewards``, ``values``, ``mask``: ``[N, T]``. Rewards are usually sparse: the verifier score
    on the last response token, minus ``beta * kl_t`` per token when the KL penalty is in the
    reward (:func:`tulu.rl.kl.kl_penalized_rewards`). Tokens off the mask are skipped as if absent
    (padding on either side, or holes), so their rewards and values never matter; they come back
    as 0. ``lam=1, gamma=1`` gives Monte-Carlo ``returns - V``; ``lam=0`` the one-step TD error.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"gae_advantages: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must all be the same [N, T] shape"
        )
    m = mask if mask.dtype == torch.bool else mask != 0
    r, v = rewards.float(), values.float()
    n, t_len = r.shape
    next_value = torch.zeros(n, device=r.device)
    next_adv = torch.zeros(n, device=r.device)
    advantages = torch.zeros_like(r)
    for t in range(t_len - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        next_adv = torch.where(mt, adv, next_adv)
        next_value = torch.where(mt, v[:, t], next_value)
        advantages[:, t] = torch.where(mt, adv, 0.0)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


def whiten_advantages(advantages: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """Normalise advantages to zero mean, unit variance over response tokens (PPO's "advantage
    normalisation"; TRL/OpenRLHF ``masked_whiten``). Padding stays 0. With data parallelism this
    whitens the local batch only; all-reduce the masked sums first for a global statistic."""
    return masked_whiten(advantages.float(), mask, shift_mean=shift_mean)
