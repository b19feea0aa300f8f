"""Verifier results -> per-sequence scores for the RL step, and per-verifier accuracy metrics.

The values follow :class:`tulu.rewards.RewardConfig` (Tülu 3: +10 for a verified answer, 0
otherwise), so the trainer and the scorer (:class:`tulu.rewards.RewardScorer`, which applies the
same rule per row) cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tulu.rewards.config import RewardConfig
from tulu.rl.kl import last_token_index

if TYPE_CHECKING:
    from tulu.rewards.scorer import ScoreResult

__all__ = ["sequence_scores", "scores_from_results", "ended_with_eos", "verifier_accuracy"]


def _as_bool(x: Tensor | Sequence[bool]) -> Tensor:
    return x.bool() if isinstance(x, Tensor) else torch.tensor(list(x), dtype=torch.bool)


def sequence_scores(
    verified: Tensor | Sequence[bool],
    ended_with_eos: Tensor | Sequence[bool] | None = None,
    *,
    config: RewardConfig = RewardConfig(),
) -> Tensor:
    """Float32 ``[N]``: ``config.verified_reward`` (10) where verified, else
    ``config.unverified_reward`` (0); minus ``config.no_eos_penalty`` (when set) for responses
    that did not end with EOS (they ran into the length limit). ``ended_with_eos=None``: all did.
    Tülu 3 (Lambert et al. 2024, arXiv:2411.15124, §6) scores RLVR this way."""
    v = _as_bool(verified)
    scores = torch.where(
        v, torch.tensor(float(config.verified_reward)), torch.tensor(float(config.unverified_reward))
    ).to(v.device)
    if ended_with_eos is not None and config.no_eos_penalty is not None:
        eos = _as_bool(ended_with_eos).to(v.device)
        if eos.shape != v.shape:
            raise ValueError(
                f"sequence_scores: verified {tuple(v.shape)} and ended_with_eos {tuple(eos.shape)} differ"
            )
        scores = scores - float(config.no_eos_penalty) * (~eos).float()
    return scores


def scores_from_results(results: Sequence["ScoreResult"], device: torch.device | str | None = None) -> Tensor:
    """The scorer's per-row rewards (already shaped by its ``RewardConfig``) as a float32 ``[N]``."""
    return torch.tensor([r.reward for r in results], dtype=torch.float32, device=device)


def ended_with_eos(tokens: Tensor, mask: Tensor, eos_token_ids: int | Sequence[int]) -> Tensor:
    """Bool ``[N]``: whether each response's last token (the last position ``mask [N, T]``
    selects) is one of ``eos_token_ids`` (Llama 3 has two: ``<|eot_id|>`` and
    ``<|end_of_text|>``). An empty response did not end with EOS."""
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    ids = torch.tensor(ids, dtype=tokens.dtype, device=tokens.device)
    m = mask if mask.dtype == torch.bool else mask != 0
    last = tokens.gather(1, last_token_index(m)[:, None]).squeeze(1)
    return torch.isin(last, ids) & m.any(dim=1)


def verifier_accuracy(verified: Tensor | Sequence[bool], verifier_names: Sequence[str]) -> dict[str, float]:
    """Share of verified responses per verifier name, plus ``"all"``: ``{"gsm8k": 0.5, …}``."""
    v = _as_bool(verified).cpu().tolist()
    if len(v) != len(verifier_names):
        raise ValueError(f"verifier_accuracy: {len(v)} results but {len(verifier_names)} verifier names")
    hits: dict[str, list[int]] = {}
    for ok, name in zip(v, verifier_names):
        counts = hits.setdefault(name, [0, 0])
        counts[0] += int(ok)
        counts[1] += 1
    out = {name: h / n for name, (h, n) in sorted(hits.items())}
    out["all"] = sum(v) / len(v) if v else 0.0
    return out
