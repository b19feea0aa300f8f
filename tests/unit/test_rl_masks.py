"""Padding never matters: whatever sits in a masked-out position (huge numbers, inf, NaN), every
function in ``tulu.rl`` returns the same result and the same gradient."""

import pytest
import torch

from tulu.rl import (
    ended_with_eos,
    gae_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    reduce_tokens,
    value_loss,
)

torch.manual_seed(0)
N, T = 3, 6
MASK = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(N, T, generator=g) for k in ("a", "b", "c", "d")}


def _corrupt(t: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(MASK, t, torch.full_like(t, fill))


FILLS = [1e4, -7.0, float("inf"), float("nan")]


@pytest.mark.parametrize("fill", FILLS)
def test_masked_reductions_ignore_padding(fill):
    x = _tensors()["a"]
    bad = _corrupt(x, fill)
    for fn in (masked_sum, masked_mean, masked_var):
        torch.testing.assert_close(fn(bad, MASK), fn(x, MASK))
    torch.testing.assert_close(masked_mean(bad, MASK, dim=1), masked_mean(x, MASK, dim=1))
    torch.testing.assert_close(masked_whiten(bad, MASK), masked_whiten(x, MASK))
    for reduction in ("token", "sequence"):
        torch.testing.assert_close(reduce_tokens(bad, MASK, reduction), reduce_tokens(x, MASK, reduction))


def test_masked_mean_of_nothing_is_zero_not_nan():
    assert masked_mean(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("fill", FILLS)
def test_gae_ignores_padded_rewards_and_values(fill):
    t = _tensors()
    ref = gae_advantages(t["a"], t["b"], MASK, gamma=0.99, lam=0.95)
    got = gae_advantages(_corrupt(t["a"], fill), _corrupt(t["b"], fill), MASK, gamma=0.99, lam=0.95)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("fill", FILLS)
def test_kl_penalized_rewards_ignore_padded_kl(fill):
    t = _tensors()
    scores = torch.tensor([10.0, 0.0, 10.0])
    ref = kl_penalized_rewards(scores, t["a"], MASK, beta=0.05)
    torch.testing.assert_close(kl_penalized_rewards(scores, _corrupt(t["a"], fill), MASK, beta=0.05), ref)


def _policy(t, fill=None):
    logp = t["a"].clone() * 0.1 - 1.0
    if fill is not None:
        logp = _corrupt(logp, fill)
    logp.requires_grad_(True)
    c = (lambda x: x) if fill is None else (lambda x: _corrupt(x, fill))
    out = policy_loss(
        logp,
        c(t["b"] * 0.1 - 1.0),
        c(t["c"]),
        MASK,
        ref_logprobs=c(t["d"] * 0.1 - 1.0),
        kl_beta=0.05,
        entropy=c(t["d"].abs()),
        entropy_coef=0.01,
    )
    out.loss.backward()
    return out, logp.grad


@pytest.mark.parametrize("fill", FILLS)
def test_policy_loss_and_its_gradient_ignore_padding(fill):
    t = _tensors()
    ref, ref_grad = _policy(t)
    got, got_grad = _policy(t, fill)
    assert ref.metrics() == pytest.approx(got.metrics())
    torch.testing.assert_close(got_grad, ref_grad)
    assert (got_grad[~MASK] == 0).all()


@pytest.mark.parametrize("fill", FILLS)
def test_value_loss_and_its_gradient_ignore_padding(fill):
    t = _tensors()
    outs = []
    for c in (lambda x: x, lambda x: _corrupt(x, fill)):
        v = c(t["a"]).detach().clone().requires_grad_(True)
        out = value_loss(v, c(t["b"]), c(t["c"]), MASK, value_clip=0.2)
        out.loss.backward()
        outs.append((out.metrics(), v.grad))
    assert outs[0][0] == pytest.approx(outs[1][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


def test_ended_with_eos_looks_at_the_last_response_token_not_the_padding():
    eos = 2
    tokens = torch.tensor([[5, 7, 2, 0, 0], [5, 7, 8, 9, 2], [5, 7, 9, 2, 2], [5, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert ended_with_eos(tokens, mask, eos).tolist() == [True, True, False, False]
    assert ended_with_eos(tokens, mask, [eos, 9]).tolist() == [True, True, True, False]
