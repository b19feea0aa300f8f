"""`mode: train`: run the config's stage: SFT or DPO on the training group (tulu.train.loop), RLVR
across the inference and training groups (tulu.rlvr.loop)."""

from __future__ import annotations

from tulu.launch.context import JobContext


def run(ctx: JobContext) -> dict:
    stage = ctx.cfg.stage
    if stage in ("sft", "dpo"):
        from tulu.train.loop import train

        return train(ctx)
    if stage == "rlvr":
        from tulu.rlvr.loop import run as run_rlvr

        return run_rlvr(ctx)
    raise ValueError(f"unknown stage {stage!r}; expected sft, dpo or rlvr")
