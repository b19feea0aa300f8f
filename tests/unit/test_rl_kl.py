"""KL estimators: zero when policy and reference agree, k3 never negative, and by sampling from
the policy all three approximate the true KL(policy || reference) of two categoricals."""

import pytest
import torch

from tulu.rl import kl_estimate, kl_k1, kl_k2, kl_k3, kl_penalized_rewards


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_are_zero_when_distributions_agree(estimator):
    logp = torch.log(torch.rand(4, 7)).clamp(min=-20)
    assert torch.equal(kl_estimate(logp, logp.clone(), estimator), torch.zeros(4, 7))


def test_k3_is_never_negative():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(10_000, generator=g) * 20
    ref = -torch.rand(10_000, generator=g) * 20
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k2(logp, ref) >= 0).all()
    assert (kl_k1(logp, ref) < 0).any()  # k1 is unbiased only on average


def test_kl_estimators_approximate_the_true_kl_by_sampling():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10])  # the policy (samples come from it)
    q = torch.tensor([0.25, 0.25, 0.25, 0.15, 0.10])  # the reference
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, ref = p.log()[x], q.log()[x]
    for estimator, tol in (("k1", 0.1), ("k3", 0.05), ("k2", 0.1)):
        est = kl_estimate(logp, ref, estimator).mean().item()
        assert est == pytest.approx(true_kl, rel=tol), estimator
    # k3 has the lowest variance of the unbiased two
    assert kl_k3(logp, ref).var() < kl_k1(logp, ref).var()


def test_unknown_estimator_lists_the_valid_names():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_kl_in_reward_puts_the_score_on_the_last_response_token():
    kl = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 1.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    rewards = kl_penalized_rewards(torch.tensor([10.0, 0.0, 10.0]), kl, mask, beta=0.05)
    expected = torch.tensor(
        [[0.0, -0.05, -0.10, 10 - 0.15, 0.0], [0.0, 0.0, -0.05, -0.05, -0.05], [0.0, 0.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(rewards, expected)
