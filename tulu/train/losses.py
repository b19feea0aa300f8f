"""Losses and their metrics, as pure tensor functions (no Megatron, no process groups).

Token log-probs come in *already shifted*: ``token_logps[b, t]`` is the log-probability of the
target at position ``t`` (the next token), and ``mask[b, t]`` says whether that target counts.

DPO as in Tülu 3 (open-instruct's ``dpo_norm``): a sequence's log-probability is the sum over its
response tokens divided by their number, and

    loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with ``pi``/``ref`` the policy's and the frozen reference's (normalised) log-probs of the chosen
(``c``) and rejected (``r``) responses. Plain ``dpo`` uses the sums. The implicit rewards are
``beta * (pi - ref)``; a pair counts as correct when the chosen reward is higher, half when tied.
With ``nll_coef`` > 0 each pair adds ``nll_coef`` times the chosen response's mean token NLL (RPO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("dpo_norm", "dpo")


def masked_token_loss_sum(token_losses: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of the per-token losses where ``mask``, number of such tokens as an int tensor)."""
    m = mask.to(token_losses.dtype)
    return (token_losses * m).sum(), mask.sum().to(torch.int)


def sequence_logps(token_logps: Tensor, mask: Tensor, normalize: bool) -> Tensor:
    """Per-row log-probability of the masked (response) tokens: ``[B, T] -> [B]``; the mean
    over those tokens when ``normalize`` (length-normalised DPO), the sum otherwise."""
    m = mask.to(token_logps.dtype)
    total = (token_logps * m).sum(-1)
    if not normalize:
        return total
    return total / m.sum(-1).clamp(min=1.0)


def dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, chosen_nll: Tensor | None = None, nll_coef: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and implicit rewards: ``(losses, chosen_rewards, rejected_rewards)``,
    each ``[pairs]``. Rewards carry no gradient. ``chosen_nll`` ([pairs], the chosen responses'
    mean token NLL) is added times ``nll_coef`` when that is > 0."""
    logits = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    if nll_coef > 0:
        losses = losses + nll_coef * chosen_nll
    chosen_rewards = beta * (pi_chosen - ref_chosen).detach()
    rejected_rewards = beta * (pi_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_correct(chosen: Tensor, rejected: Tensor) -> Tensor:
    """1 where ``chosen > rejected``, 0.5 on a tie, 0 otherwise (ties are common at step 0,
    where the policy is the reference and every reward is 0)."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def dpo_metric_sums(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                    pi_chosen: Tensor, pi_rejected: Tensor, chosen_nll: Tensor) -> dict[str, Tensor]:
    """Sums over pairs (divide by ``pairs`` after reducing across micro-batches and ranks)."""
    return {
        # falls when DPO raises the chosen answer's likelihood, rises when it displaces it
        "chosen_nll": chosen_nll.detach().sum(),
        "loss": losses.detach().sum(),
        "chosen_reward": chosen_rewards.sum(),
        "rejected_reward": rejected_rewards.sum(),
        "margin": (chosen_rewards - rejected_rewards).sum(),
        "accuracy": pair_correct(chosen_rewards, rejected_rewards).sum(),
        # the policy alone prefers the chosen response (length-normalised for dpo_norm)
        "logp_accuracy": pair_correct(pi_chosen.detach(), pi_rejected.detach()).sum(),
        "pairs": torch.tensor(float(losses.numel())),
    }
