"""Scoring an RLVR step's completions with the verifiers, on the engines or on the learner.

``rlvr.score_on: learner`` (the default): the learner's leader scores every rollout after it
collects them. ``engine``: each engine's reporting rank scores its own completions and sends the
results with them. It scores in a thread while its engine computes the reference log-probs
(``rlvr.reference_logprobs: inference``), so the learner's step does not wait for the verifiers,
and with several engines the scoring is spread over them instead of queued on one process: for
engines whose host CPUs idle (GPU engines). On the 2-core CPU box the arithmetic RLVR bench ran
~3% slower that way (the verifier workers then run beside training instead of while the learner
waits). The learner also scores any completion that arrives without a result (in-flight rollouts
stored by a checkpoint written before results travelled with them).

Both sides build the same rows (:func:`rows`) and the same scorer (:func:`build_scorer`), so the
rewards do not depend on where they were computed.
"""

from __future__ import annotations

from collections.abc import Sequence

from tulu.rewards import RewardConfig, RewardScorer
from tulu.rewards.scorer import ScoreResult

__all__ = ["build_scorer", "decode", "encode", "rows", "score"]


def build_scorer(rl, datasets) -> RewardScorer:
    """The verifiers' worker pool for ``rl`` (an ``RLVRConfig``), warmed for ``datasets``."""
    return RewardScorer(RewardConfig(verified_reward=rl.verified_reward, unverified_reward=rl.unverified_reward,
                                     no_eos_penalty=rl.no_eos_penalty or None),
                        workers=rl.verifier_workers, timeout_s=rl.verifier_timeout_s, verifiers=sorted(set(datasets)))


def rows(prompts: Sequence, responses: Sequence[Sequence[int]], tokenizer) -> list[dict]:
    """The scorer's rows for ``responses[i]`` answering ``prompts[i]`` (``tulu.rlvr.prompts.Prompt``)."""
    eos = tokenizer.eos_token_id
    return [{"completion": tokenizer.decode(ids, skip_special_tokens=True), "dataset": p.dataset,
             "ground_truth": p.ground_truth, "ended_with_eos": bool(ids) and ids[-1] == eos}
            for p, ids in zip(prompts, responses, strict=True)]


def encode(results: Sequence[ScoreResult]) -> list[list]:
    """Results as JSON-able lists (the rollout payload's ``scores``)."""
    return [[r.reward, r.verified, r.verifier, r.error] for r in results]


def decode(encoded: Sequence[Sequence]) -> list[ScoreResult]:
    return [ScoreResult(float(reward), bool(verified), str(verifier), error)
            for reward, verified, verifier, error in encoded]


def score(scorer: RewardScorer, batch: list[dict]) -> tuple[list[ScoreResult], int]:
    """``batch`` scored, and how many verifier errors the scorer counted meanwhile."""
    before = scorer.stats.errors
    results = scorer.score(batch)
    return results, scorer.stats.errors - before
