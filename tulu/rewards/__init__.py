"""Verifiable rewards for RLVR: GSM8K, MATH and IFEval verifiers and a time-limited scorer.

    from tulu.rewards import RewardConfig, RewardScorer
    with RewardScorer(RewardConfig(verified_reward=10.0), workers=2, timeout_s=5.0) as scorer:
        results = scorer.score(rows)   # rows: dicts with completion, dataset, ground_truth
        rewards = [r.reward for r in results]

Modules: ``verifier`` (the `Verifier` interface and registry), ``gsm8k``, ``hendrycks_math`` +
``sympy_guard`` (its blow-up guard), ``ifeval`` + ``ifeval_checks`` + ``sentences`` (the
verifiers), ``config`` (`RewardConfig`), ``scorer`` (`RewardScorer`, the process pool), ``worker``
(one worker process), ``score_cli`` (``tulu score``).
"""

from tulu.rewards.config import RewardConfig
from tulu.rewards.scorer import (
    RewardScorer,
    RewardScorerError,
    ScoreResult,
    ScoreStats,
    VerifierStats,
)
from tulu.rewards.verifier import (
    UnknownVerifierError,
    Verifier,
    get_verifier,
    known_verifiers,
    register_verifier,
)

__all__ = [
    "RewardConfig",
    "RewardScorer",
    "RewardScorerError",
    "ScoreResult",
    "ScoreStats",
    "UnknownVerifierError",
    "Verifier",
    "VerifierStats",
    "get_verifier",
    "known_verifiers",
    "register_verifier",
]
