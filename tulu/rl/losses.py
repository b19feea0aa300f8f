"""The PPO/GRPO clipped policy-gradient loss, the (optionally clipped) value loss, and their metrics.

Shapes: per-token tensors are ``[N, T]`` with a response ``mask`` of the same shape (see
:mod:`tulu.rl.advantages`). Every input is masked on entry with ``torch.where``, so padded
positions cannot change the loss or its gradient, whatever they hold.

Reductions (``reduction=``):

- ``"token"``: mean over all response tokens of the batch (DAPO, Yu et al. 2025,
  arXiv:2503.14476 §3.3 "token-level policy gradient loss"; TRL's default);
- ``"sequence"``: mean over each sequence's tokens, then over sequences (GRPO as written in
  DeepSeekMath, arXiv:2402.03300, eq. 3). Sequences without response tokens are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from tulu.rl.advantages import per_token
from tulu.rl.kl import KLEstimator, kl_estimate
from tulu.rl.masked import masked_mean, masked_var

__all__ = [
    "Reduction",
    "PolicyLossOutput",
    "ValueLossOutput",
    "reduce_tokens",
    "policy_loss",
    "value_loss",
    "explained_variance",
]

Reduction = Literal["token", "sequence"]


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def reduce_tokens(x: Tensor, mask: Tensor, reduction: Reduction = "token") -> Tensor:
    """Reduce per-token ``x [N, T]`` to a scalar by ``reduction`` (see the module doc)."""
    if reduction == "token":
        return masked_mean(x, mask)
    if reduction == "sequence":
        m = _bool(mask)
        per_seq = masked_mean(x, m, dim=1)
        return masked_mean(per_seq, m.any(dim=1))
    raise ValueError(f"unknown loss reduction {reduction!r}; valid: 'sequence', 'token'")


@dataclass(kw_only=True, slots=True, frozen=True)
class PolicyLossOutput:
    """``loss`` carries the gradient; the rest are detached 0-dim tensors (token-level masked
    means), ready to be all-reduced across data-parallel ranks before ``metrics()``.

    ``clip_frac``: share of response tokens where clipping took the gradient away; ``approx_kl``:
    KL(old || new) by k3 on the ratio (PPO's early-stopping signal); ``ref_kl``: KL(policy ||
    reference) by the chosen estimator, when reference log-probs were given; ``entropy`` when
    per-token entropies were given.
    """

    loss: Tensor
    pg_loss: Tensor
    kl_loss: Tensor | None
    clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor
    ratio_max: Tensor
    adv_mean: Tensor
    adv_std: Tensor
    ref_kl: Tensor | None = None
    entropy: Tensor | None = None

    def metrics(self, prefix: str = "policy/") -> dict[str, float]:
        """Every set field as a float, named ``prefix + field``."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {prefix + name: float(v.detach()) for name, v in values if v is not None}


@dataclass(kw_only=True, slots=True, frozen=True)
class ValueLossOutput:
    """``loss`` carries the gradient; the rest are detached 0-dim tensors."""

    loss: Tensor
    clip_frac: Tensor
    explained_variance: Tensor
    values_mean: Tensor
    returns_mean: Tensor

    def metrics(self, prefix: str = "value/") -> dict[str, float]:
        return {prefix + f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    reduction: Reduction = "token",
) -> PolicyLossOutput:
    """Clipped surrogate loss (PPO, Schulman et al. 2017, arXiv:1707.06347, eq. 7), negated::

        ratio_t = exp(logp_t - old_logp_t)
        pg_t    = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high))
        loss    = reduce(pg) + kl_beta * reduce(kl_t) - entropy_coef * reduce(H_t)

    ``logprobs [N, T]`` carry the gradient; ``old_logprobs`` (the sampling policy's, from the
    trainer's own forward pass before the update) and ``advantages`` (``[N, T]``, or ``[N]``
    broadcast to every response token, as GRPO's) are treated as constants. ``clip_eps_high``
    defaults to ``clip_eps`` (set it higher for DAPO's "clip-higher", arXiv:2503.14476 §3.1).

    KL to the reference in the loss (GRPO style, DeepSeekMath eq. 3) when ``ref_logprobs`` is
    given and ``kl_beta > 0``; with ``kl_beta = 0`` the KL is only reported (PPO/Tülu style puts
    it in the reward instead: :func:`tulu.rl.kl.kl_penalized_rewards`). ``entropy [N, T]`` (from
    :func:`tulu.rl.logprobs.entropy_from_logits`) is reported, and subtracted as a bonus when
    ``entropy_coef > 0``.
    """
    m = _bool(mask)
    if logprobs.shape != m.shape or old_logprobs.shape != m.shape:
        raise ValueError(
            f"policy_loss: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} "
            f"and mask {tuple(m.shape)} must have the same [N, T] shape"
        )
    if advantages.dim() == 1:
        advantages = per_token(advantages, m)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    zero = torch.zeros((), device=logprobs.device)
    logp = torch.where(m, logprobs.float(), zero)
    old = torch.where(m, old_logprobs.detach().float(), zero)
    adv = torch.where(m, advantages.detach().float(), zero)

    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi)
    pg = torch.maximum(unclipped, clipped)
    pg_loss = reduce_tokens(pg, m, reduction)
    loss = pg_loss

    kl_loss = ref_kl = None
    if ref_logprobs is not None:
        ref = torch.where(m, ref_logprobs.detach().float(), zero)
        kl = kl_estimate(logp if kl_beta else logp.detach(), ref, kl_estimator)
        ref_kl = masked_mean(kl.detach(), m)
        if kl_beta:
            kl_loss = reduce_tokens(kl, m, reduction)
            loss = loss + kl_beta * kl_loss
    ent = None
    if entropy is not None:
        h = torch.where(m, entropy.float(), zero)
        ent = masked_mean(h.detach(), m)
        if entropy_coef:
            loss = loss - entropy_coef * reduce_tokens(h, m, reduction)

    with torch.no_grad():
        return PolicyLossOutput(
            loss=loss,
            pg_loss=pg_loss.detach(),
            kl_loss=None if kl_loss is None else kl_loss.detach(),
            clip_frac=masked_mean((clipped > unclipped).float(), m),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            ratio_mean=masked_mean(ratio, m),
            ratio_max=torch.where(m, ratio, zero).amax(),
            adv_mean=masked_mean(adv, m),
            adv_std=masked_var(adv, m).sqrt(),
            ref_kl=ref_kl,
            entropy=ent,
        )


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over response tokens: 1 is a perfect value
    model, 0 no better than a constant, < 0 worse. 0 when the returns do not vary."""
    m = _bool(mask)
    var_r = masked_var(returns.float(), m)
    var_diff = masked_var(returns.float() - values.float(), m)
    return torch.where(var_r > 0, 1.0 - var_diff / var_r.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    value_clip: float | None = 0.2,
    coef: float = 1.0,
    reduction: Reduction = "token",
) -> ValueLossOutput:
    """``coef * 0.5 * reduce(max((V - R)^2, (V_clip - R)^2))`` with ``V_clip = V_old +
    clip(V - V_old, -value_clip, value_clip)`` (PPO2's value clipping, as OpenAI baselines, TRL
    and open-instruct); ``value_clip=None`` uses the plain squared error. ``values [N, T]`` carry
    the gradient; ``old_values`` (the value model's before the update) and ``returns`` (from
    :func:`tulu.rl.advantages.gae_advantages`) are constants.
    """
    m = _bool(mask)
    zero = torch.zeros((), device=values.device)
    v = torch.where(m, values.float(), zero)
    v_old = torch.where(m, old_values.detach().float(), zero)
    ret = torch.where(m, returns.detach().float(), zero)
    err = (v - ret) ** 2
    if value_clip is None:
        per_tok = err
        clip_frac = zero
    else:
        v_clipped = v_old + torch.clamp(v - v_old, -value_clip, value_clip)
        err_clipped = (v_clipped - ret) ** 2
        per_tok = torch.maximum(err, err_clipped)
        clip_frac = masked_mean((err_clipped > err).float().detach(), m)
    loss = coef * 0.5 * reduce_tokens(per_tok, m, reduction)
    with torch.no_grad():
        return ValueLossOutput(
            loss=loss,
            clip_frac=clip_frac,
            explained_variance=explained_variance(v, ret, m),
            values_mean=masked_mean(v, m),
            returns_mean=masked_mean(ret, m),
        )
