"""Advantages: GRPO's group normalisation and PPO's GAE keep their textbook promises, on
hand-worked numbers, and whitening ignores padding."""

import math

import pytest
import torch

from tulu.rl import gae_advantages, grpo_advantages, masked_mean, masked_var, per_token, whiten_advantages


def test_grpo_advantages_match_hand_calculation_and_are_zero_mean_per_group():
    rewards = torch.tensor([10.0, 0, 0, 0, 10, 10, 0, 0])
    adv = grpo_advantages(rewards, samples_per_prompt=4, eps=0.0)
    # group 1: mean 2.5, sample std sqrt((7.5² + 3·2.5²)/3) = 5
    # group 2: mean 5, sample std sqrt(4·25/3)
    s2 = math.sqrt(100 / 3)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 5 / s2, 5 / s2, -5 / s2, -5 / s2])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(adv.view(2, 4).mean(dim=1), torch.zeros(2))


def test_dr_grpo_advantages_are_centred_but_not_scaled():
    rewards = torch.tensor([10.0, 0, 0, 0, 3, 1])
    adv = grpo_advantages(rewards, samples_per_prompt=2, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([5.0, -5, 0, 0, 1, -1]))


def test_group_of_equal_rewards_gets_zero_advantage_not_nan():
    adv = grpo_advantages(torch.tensor([10.0, 10, 10, 0, 0, 0]), samples_per_prompt=3)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, torch.zeros(6))


def test_grpo_rejects_groups_it_cannot_normalise():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        grpo_advantages(torch.zeros(5), samples_per_prompt=2)
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(torch.zeros(4), samples_per_prompt=1)


def test_per_token_broadcasts_sequence_advantages_onto_response_tokens_only():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    out = per_token(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2, 2, 0], [-1.0, -1, -1, -1]]))


# One response of 4 tokens after 1 prompt token and before 2 padding tokens.
MASK = torch.tensor([[0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
REWARDS = torch.tensor([[0.0, 0, 0, 0, 1, 0, 0]])
VALUES = torch.tensor([[0.0, 0.5, 0.6, 0.7, 0.8, 0, 0]])


def test_gae_with_lambda_one_gamma_one_is_monte_carlo_return_minus_value():
    adv, ret = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 0.4, 0.3, 0.2, 0, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1, 1, 1, 1, 0, 0]]))


def test_gae_with_lambda_one_discounts_the_monte_carlo_return():
    adv, ret = gae_advantages(REWARDS, VALUES, MASK, gamma=0.9, lam=1.0)
    returns = torch.tensor([[0.0, 0.729, 0.81, 0.9, 1.0, 0, 0]])
    torch.testing.assert_close(ret, returns)
    torch.testing.assert_close(adv, torch.where(MASK, returns - VALUES, 0.0))


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    adv, ret = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)
    # delta_t = r_t + V_{t+1} - V_t, and V after the last token is 0
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.1, 0.1, 0.1, 0.2, 0, 0]]))
    torch.testing.assert_close(ret, torch.where(MASK, adv + VALUES, 0.0))


def test_gae_intermediate_lambda_matches_hand_recursion():
    adv, _ = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=0.5)
    # A3 = 0.2; A2 = 0.1 + 0.5·0.2 = 0.2; A1 = 0.2; A0 = 0.2
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.2, 0.2, 0.2, 0.2, 0, 0]]))


def test_gae_handles_variable_lengths_per_row():
    rewards = torch.tensor([[0.0, 0, 1], [0.0, 2, 0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1, 1], [2.0, 2, 0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0]]))


def test_gae_skips_masked_holes_as_if_the_tokens_were_absent():
    rewards = torch.tensor([[0.1, 0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.5, 0.6, 0.7]])
    holed = torch.tensor([[1, 0, 1, 1]])
    adv, ret = gae_advantages(rewards, values, holed, gamma=0.9, lam=0.8)
    keep = [0, 2, 3]
    adv_ref, ret_ref = gae_advantages(rewards[:, keep], values[:, keep], torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[:, keep], adv_ref)
    torch.testing.assert_close(ret[:, keep], ret_ref)
    assert adv[0, 1] == 0 and ret[0, 1] == 0


def test_whitening_gives_zero_mean_unit_variance_over_response_tokens():
    torch.manual_seed(0)
    adv = torch.randn(4, 9) * 3 + 2
    mask = torch.rand(4, 9) > 0.3
    w = whiten_advantages(adv, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-5
    assert abs(masked_var(w, mask).item() - 1) < 1e-4
    assert (w[~mask] == 0).all()
    shifted = whiten_advantages(adv, mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(shifted, mask), masked_mean(adv, mask))
