"""RL math for RLVR, pure torch: callers pass tensors, nothing here is distributed or model code.

    from tulu.rl import grpo_advantages, per_token, policy_loss, token_logprobs
    logp = token_logprobs(logits, tokens, temperature)   # [B, T-1], aligned with tokens[:, 1:]
    mask = response_mask[:, 1:]                          # so align the response mask the same way
    adv = per_token(grpo_advantages(scores, samples_per_prompt=8), mask)
    out = policy_loss(logp, old_logp, adv, mask, ref_logprobs=ref_logp, kl_beta=0.05)
    out.loss.backward(); log(out.metrics())

Modules: ``masked`` (masked sum/mean/var/whiten), ``advantages`` (GRPO, GAE, whitening),
``kl`` (k1/k2/k3 estimators, KL in the reward), ``losses`` (clipped policy loss, value loss),
``logprobs`` (token log-probs and entropy from logits, fp32, chunked), ``reward`` (verifier
results -> scores, accuracy metrics).
"""

from tulu.rl.advantages import gae_advantages, grpo_advantages, per_token, whiten_advantages
from tulu.rl.kl import KLEstimator, kl_estimate, kl_k1, kl_k2, kl_k3, kl_penalized_rewards, last_token_index
from tulu.rl.logprobs import entropy_from_logits, selected_logprobs, token_logprobs
from tulu.rl.losses import (
    PolicyLossOutput,
    Reduction,
    ValueLossOutput,
    explained_variance,
    policy_loss,
    reduce_tokens,
    value_loss,
)
from tulu.rl.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten
from tulu.rl.reward import ended_with_eos, scores_from_results, sequence_scores, verifier_accuracy

__all__ = [
    "KLEstimator",
    "PolicyLossOutput",
    "Reduction",
    "ValueLossOutput",
    "ended_with_eos",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
    "last_token_index",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token",
    "policy_loss",
    "reduce_tokens",
    "scores_from_results",
    "selected_logprobs",
    "sequence_scores",
    "token_logprobs",
    "value_loss",
    "verifier_accuracy",
    "whiten_advantages",
]
