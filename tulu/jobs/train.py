"""`mode: train`: run the config's stage (SFT or DPO) on the training group (tulu.train.loop)."""

from __future__ import annotations

from tulu.launch.context import JobContext


def run(ctx: JobContext) -> dict:
    stage = ctx.cfg.stage
    if stage in ("sft", "dpo"):
        from tulu.train.loop import train

        return train(ctx)
    if stage == "rlvr":
        raise NotImplementedError(
            "stage rlvr: the RLVR trainer (inference group + bridge + policy updates) is not built yet; "
            "mode train runs stage sft or dpo. Use `tulu rehearse` to check an RLVR layout.")
    raise ValueError(f"unknown stage {stage!r}; expected sft, dpo or rlvr")
