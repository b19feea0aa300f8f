"""Reward shaping: +10 for a verified answer, 0 otherwise, minus the no-EOS penalty when set; and
per-verifier accuracy."""

import pytest
import torch

from tulu.rewards import RewardConfig
from tulu.rewards.scorer import ScoreResult
from tulu.rl import scores_from_results, sequence_scores, verifier_accuracy


def test_verified_gets_ten_unverified_gets_zero():
    scores = sequence_scores([True, False, True])
    assert scores.dtype == torch.float32
    assert scores.tolist() == [10.0, 0.0, 10.0]


def test_no_eos_penalty_is_subtracted_from_responses_that_hit_the_length_limit():
    cfg = RewardConfig(no_eos_penalty=3.0)
    verified = torch.tensor([True, True, False, False])
    eos = torch.tensor([True, False, True, False])
    scores = sequence_scores(verified, eos, config=cfg)
    assert scores.tolist() == [10.0, 7.0, 0.0, -3.0]


def test_without_a_penalty_eos_does_not_matter():
    assert sequence_scores([True, False], [False, False]).tolist() == [10.0, 0.0]


def test_trainer_and_scorer_agree_on_every_case():
    cfg = RewardConfig(verified_reward=1.0, unverified_reward=-0.5, no_eos_penalty=0.25)
    cases = [(v, e) for v in (True, False) for e in (True, False)]
    scores = sequence_scores([v for v, _ in cases], [e for _, e in cases], config=cfg)
    assert scores.tolist() == [cfg.reward(v, e) for v, e in cases]
    results = [ScoreResult(cfg.reward(v, e), v, "gsm8k") for v, e in cases]
    assert scores_from_results(results).tolist() == scores.tolist()


def test_verifier_accuracy_per_name_and_overall():
    acc = verifier_accuracy([True, False, True, True], ["gsm8k", "gsm8k", "math", "ifeval"])
    assert acc == {"gsm8k": 0.5, "ifeval": 1.0, "math": 1.0, "all": 0.75}
    with pytest.raises(ValueError, match="verifier names"):
        verifier_accuracy([True], ["gsm8k", "math"])
