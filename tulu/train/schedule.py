"""The learning-rate schedule: linear warm-up, then linear or cosine decay to ``min_lr``.

A pure function of the step, so resuming needs only the step count; ``state_dict`` still records
the settings, and a resume under different settings is reported rather than silently mixed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class LRSchedule:
    lr: float
    min_lr: float
    kind: str  # "linear" | "cosine" | "constant"
    warmup_steps: int
    total_steps: int
    step: int = 0  # optimizer steps taken

    @classmethod
    def from_optim(cls, optim, total_steps: int) -> "LRSchedule":
        """From an ``OptimConfig`` (``lr``, ``min_lr``, ``lr_schedule``, ``warmup_ratio``)."""
        return cls(lr=optim.lr, min_lr=optim.min_lr, kind=optim.lr_schedule,
                   warmup_steps=int(round(optim.warmup_ratio * total_steps)), total_steps=total_steps)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_schedule must be linear, cosine or constant, got {self.kind!r}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based: the first step is 0)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor

    @property
    def current_lr(self) -> float:
        return self.lr_at(self.step)

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        settings = {k: v for k, v in state.items() if k != "step"}
        mine = {k: v for k, v in asdict(self).items() if k != "step"}
        if settings != mine:
            import logging

            logging.getLogger("tulu.train").warning(
                "LR schedule changed since the checkpoint: %s -> %s (the new one applies)", settings, mine)
        self.step = int(state["step"])
