"""`RewardConfig`: how a verification becomes a reward value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True, frozen=True)
class RewardConfig:
    """Reward values for RLVR (Tülu 3 used +10 for a verified answer, 0 otherwise).

    ``no_eos_penalty``: when set, it is *subtracted* from the reward of a completion that did not
    end with the end-of-sequence token (it ran into the length limit), verified or not. None (the
    default) leaves such completions alone. (Tülu 3's ``non_stop_penalty`` instead *replaced* the
    reward of those completions with a fixed value; set ``verified_reward``/``unverified_reward``
    and a penalty to taste.)
    """

    verified_reward: float = 10.0
    unverified_reward: float = 0.0
    no_eos_penalty: float | None = None

    def __post_init__(self) -> None:
        for name in ("verified_reward", "unverified_reward", "no_eos_penalty"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, float)):
                raise TypeError(f"RewardConfig.{name} must be a number, got {value!r}")

    def reward(self, verified: bool, ended_with_eos: bool = True) -> float:
        """The reward of one completion."""
        value = float(self.verified_reward if verified else self.unverified_reward)
        if self.no_eos_penalty is not None and not ended_with_eos:
            value -= float(self.no_eos_penalty)
        return value
