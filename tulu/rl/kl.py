"""Per-token estimators of KL(policy || reference) from the log-probs of sampled tokens, and the
two places the penalty can go: in the reward (PPO, Tülu 3) or in the loss (GRPO).

Source: John Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With ``x ~ policy`` and ``log_ratio = logp_ref(x) - logp(x)`` (so ``ratio = ref / policy``):

- ``k1 = -log_ratio = logp - logp_ref``: unbiased, high variance, can be negative per token.
- ``k2 = 0.5 * log_ratio**2``: biased (low bias when the two are close), always >= 0, low
  variance; its gradient in the loss is the gradient of the true reverse KL.
- ``k3 = exp(log_ratio) - log_ratio - 1``: unbiased *and* always >= 0 (``e^u >= 1 + u``), low
  variance; the estimator in GRPO's loss (DeepSeekMath, arXiv:2402.03300, eq. 4).

All are 0 where the two log-probs agree. Inputs are ``[N, T]`` (or any equal shapes); outputs have
the same shape, in float32. Mask them with :mod:`tulu.rl.masked` (or let the loss do it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "KLEstimator",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "kl_penalized_rewards",
    "last_token_index",
]

KLEstimator = Literal["k1", "k2", "k3"]


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``logp - logp_ref``: the naive unbiased estimator (Schulman's k1)."""
    return logprobs.float() - ref_logprobs.float()


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``0.5 * (logp - logp_ref)**2``: low variance, >= 0, slightly biased (Schulman's k2)."""
    return 0.5 * (logprobs.float() - ref_logprobs.float()) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``exp(ref - logp) - (ref - logp) - 1``: unbiased, >= 0, low variance (Schulman's k3)."""
    log_ratio = ref_logprobs.float() - logprobs.float()
    return torch.expm1(log_ratio) - log_ratio


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL(policy || reference) by the named estimator (``"k1"``, ``"k2"`` or ``"k3"``)."""
    try:
        fn = _ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid: {', '.join(sorted(_ESTIMATORS))}"
        ) from None
    return fn(logprobs, ref_logprobs)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last selected position in each row of ``mask [N, T]`` (0 for an empty row)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, -1).amax(dim=1).clamp(min=0)


def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    """Per-token rewards with the KL penalty in the reward (PPO-RLHF, Ouyang et al. 2022 eq. 2;
    Tülu 3 RLVR, Lambert et al. 2024 §6): ``r_t = -beta * kl_t`` on every response token, plus the
    sequence's ``score`` on its last response token. Feed the result to
    :func:`tulu.rl.advantages.gae_advantages`. (The GRPO alternative puts ``beta * kl`` in the
    loss instead: pass ``ref_logprobs`` and ``kl_beta`` to :func:`tulu.rl.losses.policy_loss`.)

    ``scores [N]``; ``kl`` and ``mask [N, T]``; the KL is treated as a constant (detached). Off the
    mask the reward is 0; a row with no response token gets nothing (its score is dropped).
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    rewards = torch.where(m, -beta * kl.detach().float(), 0.0)
    last = last_token_index(m)
    bonus = torch.zeros_like(rewards).scatter_(1, last[:, None], scores.float()[:, None])
    return rewards + torch.where(m, bonus, 0.0)
