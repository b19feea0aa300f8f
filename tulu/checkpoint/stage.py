"""``StageCheckpoint``: the model of a verified tulu checkpoint, as a later stage starts from it.

An earlier stage's checkpoint folder (``runs/<sft>/checkpoints`` or one ``step_N``) given as
``model.name_or_path`` or ``init_from``: found by its manifest (the commit marker), never by the
folder merely existing; it records its architecture and tokenizer (``model_source`` in the
trainer state's ``extra_state``) and loads into any TP/PP layout (it reshards).

Its home is the checkpoint package (``tulu.train.model.StageCheckpoint`` is the same class).
``tulu.config.shapes`` asks it, in a function, for the shape an earlier stage recorded: the one
import from the config layer upward, listed in ``tests/unit/test_layering.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["StageCheckpoint"]


@dataclass
class StageCheckpoint:
    """The model of a verified tulu checkpoint (any TP/PP: it reshards on load)."""

    path: Path

    @classmethod
    def find(cls, name_or_path: str) -> "StageCheckpoint | None":
        p = Path(name_or_path)
        if not p.is_dir() or not ((p / "manifest.json").exists() or any(p.glob("step_*/manifest.json"))):
            return None
        from tulu.checkpoint.manager import resolve_checkpoint

        path, _ = resolve_checkpoint(p)
        return cls(path)

    def model_source(self) -> dict:
        import torch

        from tulu.checkpoint.manager import TRAINER_STATE

        extra = torch.load(self.path / TRAINER_STATE, weights_only=False)["extra_state"]
        if "model_source" not in extra:
            raise ValueError(f"checkpoint {self.path} does not record its architecture (not written by tulu.train)")
        return extra["model_source"]

    def load_into(self, model) -> None:
        from tulu.checkpoint import sharded

        sharded.load_model(model, self.path / "model")
