"""Entry of an RLVR `train` job: each task runs its role's side of the step loop."""

from __future__ import annotations


def run(ctx) -> dict:
    if ctx.role.role == "inference":
        from tulu.rlvr.inference_worker import run as run_inference

        return run_inference(ctx)
    from tulu.rlvr.learner import run as run_learner

    return run_learner(ctx)
