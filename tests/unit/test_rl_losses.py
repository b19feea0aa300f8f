"""The clipped policy loss: equal to the plain surrogate inside the trust region, no gradient past
the clip in the clipped direction, clip fraction counted right; the value loss clips as PPO2."""

import pytest
import torch

from tulu.rl import explained_variance, kl_k3, policy_loss, value_loss

EPS = 0.2


def _loss(ratios, advs, mask=None, **kw):
    ratios = torch.tensor([ratios], dtype=torch.float32)
    old = torch.full_like(ratios, -1.5)
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.ones_like(ratios) if mask is None else torch.tensor([mask])
    out = policy_loss(logp, old, torch.tensor([advs]), mask, clip_eps=EPS, **kw)
    out.loss.backward()
    return out, logp.grad[0]


def test_clipped_loss_equals_unclipped_inside_the_trust_region():
    ratios, advs = [0.85, 1.0, 1.1, 1.19], [1.0, -2.0, 0.5, -1.0]
    out, grad = _loss(ratios, advs)
    r, a = torch.tensor(ratios), torch.tensor(advs)
    assert out.loss.item() == pytest.approx((-(a * r)).mean().item())
    torch.testing.assert_close(grad, -(a * r) / 4)  # d(-A·r)/dlogp = -A·r, averaged over 4 tokens
    assert out.clip_frac.item() == 0


def test_no_gradient_past_the_clip_in_the_clipped_direction():
    # A>0 with ratio above 1+eps, A<0 with ratio below 1-eps: clipped, gradient 0
    # A>0 with ratio below 1-eps, A<0 with ratio above 1+eps: the pessimistic bound keeps the gradient
    ratios, advs = [1.5, 0.5, 0.5, 1.5], [1.0, -1.0, 1.0, -1.0]
    out, grad = _loss(ratios, advs)
    assert grad[0] == 0 and grad[1] == 0
    torch.testing.assert_close(grad[2:], torch.tensor([-0.5 / 4, 1.5 / 4]))
    expected = [-1.2, 0.8 * 1.0, -0.5, 1.5]  # per-token -A·clip(r) or -A·r, whichever is larger
    assert out.loss.item() == pytest.approx(sum(expected) / 4)


def test_clip_fraction_counts_only_clipped_response_tokens():
    ratios = [1.5, 0.5, 0.5, 1.5, 1.0, 1.3]
    advs = [1.0, -1.0, 1.0, -1.0, 1.0, 1.0]
    out, _ = _loss(ratios, advs, mask=[1, 1, 1, 1, 1, 0])  # the last one would be clipped: padding
    assert out.clip_frac.item() == pytest.approx(2 / 5)
    assert out.ratio_mean.item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.0) / 5)


def test_clip_higher_widens_only_the_upper_bound():
    out, grad = _loss([1.25, 0.75], [1.0, -1.0], clip_eps_high=0.28)
    assert grad[0] != 0  # 1.25 < 1.28: not clipped
    assert grad[1] == 0  # 0.75 < 0.8: clipped
    assert out.clip_frac.item() == pytest.approx(0.5)


def test_approx_kl_is_k3_of_old_versus_new():
    ratios = [0.9, 1.2, 1.0]
    out, _ = _loss(ratios, [1.0, 1.0, 1.0])
    r = torch.tensor(ratios)
    assert out.approx_kl.item() == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-5)


def test_sequence_reduction_averages_each_sequence_first():
    old = torch.zeros(2, 4)
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    token = policy_loss(logp, old, adv, mask, reduction="token")
    seq = policy_loss(logp, old, adv, mask, reduction="sequence")
    assert token.loss.item() == pytest.approx(-(4 * 1 + 4) / 5)
    assert seq.loss.item() == pytest.approx(-(1 + 4) / 2)


def test_sequence_advantages_broadcast_like_per_token_ones():
    torch.manual_seed(0)
    logp, old = torch.randn(3, 5) * 0.1, torch.randn(3, 5) * 0.1
    mask = torch.rand(3, 5) > 0.3
    adv = torch.randn(3)
    a = policy_loss(logp, old, adv, mask)
    b = policy_loss(logp, old, adv[:, None].expand(3, 5), mask)
    assert a.metrics() == pytest.approx(b.metrics())


def test_kl_in_the_loss_adds_beta_times_mean_k3_and_its_gradient():
    torch.manual_seed(0)
    logp = (torch.randn(2, 4) * 0.1 - 1).requires_grad_(True)
    ref = torch.randn(2, 4) * 0.1 - 1
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = policy_loss(logp, logp.detach(), torch.zeros(2, 4), mask, ref_logprobs=ref, kl_beta=0.05)
    expected = 0.05 * kl_k3(logp, ref).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (g,) = torch.autograd.grad(out.loss, logp)
    (g_ref,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g, g_ref)
    assert out.ref_kl.item() == pytest.approx(kl_k3(logp, ref).mean().item(), rel=1e-5)


def test_kl_with_zero_beta_is_reported_but_not_in_the_loss():
    logp = torch.full((1, 3), -1.0, requires_grad=True)
    ones = torch.ones(1, 3)
    out = policy_loss(logp, logp.detach(), ones, ones, ref_logprobs=torch.full((1, 3), -2.0))
    assert out.kl_loss is None and out.ref_kl.item() > 0
    assert out.loss.item() == pytest.approx(-1.0)


def test_metrics_are_named_floats():
    logp = torch.zeros(1, 3, requires_grad=True)
    ones = torch.ones(1, 3)
    m = policy_loss(logp, torch.zeros(1, 3), ones, ones, entropy=ones).metrics()
    assert {"policy/loss", "policy/clip_frac", "policy/approx_kl", "policy/ratio_mean", "policy/entropy",
            "policy/adv_mean", "policy/adv_std"} <= m.keys()
    assert all(isinstance(v, float) for v in m.values())
    assert "policy/ref_kl" not in m


def test_value_loss_clips_around_the_old_value():
    values = torch.tensor([[1.0, 0.5, 2.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 1.0]])
    returns = torch.tensor([[0.0, 1.0, 2.0]])
    mask = torch.ones(1, 3)
    out = value_loss(values, old, returns, mask, value_clip=0.2, coef=0.5)
    # token 0: err (1-0)²=1, clipped V=0.7 -> 0.49, max 1 (unclipped wins, gradient kept)
    # token 1: err 0.25, V unchanged -> 0.25
    # token 2: err 0, clipped V=1.2 -> 0.64: the clipped term wins, no gradient
    assert out.loss.item() == pytest.approx(0.5 * 0.5 * (1 + 0.25 + 0.64) / 3)
    assert out.clip_frac.item() == pytest.approx(1 / 3)
    out.loss.backward()
    assert values.grad[0, 2] == 0 and values.grad[0, 0] != 0
    plain = value_loss(values.detach(), old, returns, mask, value_clip=None, coef=1.0)
    assert plain.loss.item() == pytest.approx(0.5 * (1 + 0.25 + 0) / 3)


def test_explained_variance_is_one_for_a_perfect_value_model_and_zero_for_a_constant():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 7.0), returns, mask).item() == pytest.approx(0.0)
    assert explained_variance(returns, torch.ones(1, 4), mask).item() == 0.0  # returns do not vary
