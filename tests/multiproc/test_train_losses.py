"""The pure pieces of tulu.train (no processes): the LR schedule, next-token targets, and the
DPO loss and its metrics against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from tulu.train import batches, losses
from tulu.train.schedule import LRSchedule


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    s = LRSchedule(lr=1.0, min_lr=0.1, kind="cosine", warmup_steps=4, total_steps=14)
    assert [s.lr_at(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == 1.0 and s.lr_at(9) == pytest.approx(0.55) and s.lr_at(14) == pytest.approx(0.1)
    lin = LRSchedule(lr=1.0, min_lr=0.0, kind="linear", warmup_steps=0, total_steps=10)
    assert [round(lin.lr_at(i), 6) for i in (0, 5, 9)] == [1.0, 0.5, 0.1]
    assert LRSchedule(lr=2.0, min_lr=0.0, kind="constant", warmup_steps=0, total_steps=3).lr_at(2) == 2.0


def test_lr_schedule_resumes_from_its_state():
    a = LRSchedule(lr=1.0, min_lr=0.0, kind="linear", warmup_steps=2, total_steps=10)
    for _ in range(5):
        a.advance()
    b = LRSchedule(lr=1.0, min_lr=0.0, kind="linear", warmup_steps=2, total_steps=10)
    b.load_state_dict(a.state_dict())
    assert b.step == 5 and b.current_lr == a.current_lr


def test_targets_are_the_labels_shifted_left_with_ignored_positions_masked():
    labels = torch.tensor([[-100, -100, 7, 8, 9]])
    targets, mask = batches.next_token_targets(labels)
    assert targets.tolist() == [[0, 7, 8, 9, 0]]
    assert mask.tolist() == [[False, True, True, True, False]]


def test_length_normalised_dpo_matches_a_hand_computation():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    norm = losses.sequence_logps(token_logps, mask, normalize=True)
    assert norm.tolist() == [-2.0, -1.0]
    assert losses.sequence_logps(token_logps, mask, normalize=False).tolist() == [-6.0, -2.0]
    pi_c, pi_r, ref_c, ref_r, beta = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 5.0
    loss, rc, rr = losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    logit = beta * ((-1.0 + 1.5) - (-2.0 + 1.5))  # 5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-logit)))
    assert rc.item() == pytest.approx(2.5) and rr.item() == pytest.approx(-2.5)
    sums = losses.dpo_metric_sums(loss, rc, rr, pi_c, pi_r, -pi_c)
    assert sums["accuracy"].item() == 1.0 and sums["margin"].item() == pytest.approx(5.0)
    assert sums["chosen_nll"].item() == pytest.approx(1.0)


def test_rpo_adds_the_chosen_answers_nll_and_its_gradient_raises_the_chosen_alone():
    """nll_coef (RPO): DPO + coef x the chosen answer's mean token NLL; where the DPO term is
    saturated (a wide margin) the chosen answer is still pulled up, the rejected one left alone."""
    pi_c, pi_r = torch.tensor([-1.0], requires_grad=True), torch.tensor([-9.0], requires_grad=True)
    ref = torch.tensor([-1.0])
    plain, _, _ = losses.dpo_loss(pi_c, pi_r, ref, ref, beta=5.0)
    rpo, _, _ = losses.dpo_loss(pi_c, pi_r, ref, ref, beta=5.0, chosen_nll=-pi_c, nll_coef=0.5)
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * 1.0)
    (rpo - plain).sum().backward()
    assert pi_c.grad.item() == pytest.approx(-0.5) and pi_r.grad.item() == 0.0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pi_c, pi_r = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    loss, _, _ = losses.dpo_loss(pi_c, pi_r, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=1.0)
    loss.sum().backward()
    assert pi_c.grad.item() < 0 < pi_r.grad.item()  # descent raises pi_c, lowers pi_r


def test_ties_count_half_in_accuracy():
    assert losses.pair_correct(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 0.0])).tolist() == [1.0, 0.5, 0.0]


def test_dpo_micro_batches_keep_each_pair_chosen_then_rejected():
    rows = torch.arange(8)[:, None].expand(8, 4)  # 4 pairs: rows 0-3 chosen, 4-7 rejected
    batch = {"tokens": rows, "labels": rows, "position_ids": rows, "document_ids": torch.zeros_like(rows),
             "attention_mask": torch.ones_like(rows)}
    mbs = batches.split_pairs(batch, 2)
    assert [mb["tokens"][:, 0].tolist() for mb in mbs] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert all(mb["pairs"] == 2 and mb["attention_mask"] is None for mb in mbs)
