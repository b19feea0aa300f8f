"""A tiny resumable loop over all ranks: proves that time limits, preemption, requeues and
crashes resume from the last saved state. Real trainers follow the same pattern: agree on stop
at a step boundary, save, requeue, exit."""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

from tulu.dist import groups as tdist
from tulu.atomic import write_json_atomic
from tulu.launch.context import JobContext


def run(ctx: JobContext) -> dict:
    rc = ctx.cfg.run
    state_file = ctx.run_dir / "counter" / "state.json"
    with ctx.phase("setup", 0):
        tdist.init_whole_job_world(ctx.env, timeout_s=ctx.cfg.monitoring.collective_timeout_s)
    state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "total": 0, "history": []}
    step, total = state["step"], state["total"]
    ctx.log(f"counter resumes at step {step} (total {total}), attempt {ctx.env.restart_count}")
    ctx.step_done(step)  # the monitor compares fault steps across attempts: report where we resume
    if ctx.is_global_leader:
        state["history"].append({"attempt": ctx.env.restart_count, "resumed_at": step, "time": time.time()})
        write_json_atomic(state_file, state)

    def save():
        if ctx.is_global_leader:
            state.update(step=step, total=total)
            write_json_atomic(state_file, state)

    while step < rc.counter_steps:
        ctx.fault_point("train", step)
        with ctx.phase("train", step):
            time.sleep(rc.counter_step_s)
            contribution = torch.tensor([float(ctx.env.global_rank + 1)])
            dist.all_reduce(contribution)
        step += 1
        total += int(contribution.item())
        ctx.step_done(step)
        ctx.log(f"step {step} total {total}")
        if step % rc.counter_checkpoint_interval == 0:
            ctx.fault_point("checkpoint", step)
            with ctx.phase("checkpoint", step):
                save()
                dist.barrier()
        if step < rc.counter_steps and ctx.stop.agree():
            with ctx.phase("checkpoint", step):
                save()
                dist.barrier()
            ctx.log(f"stop requested ({ctx.stop.signal_name or 'by another rank'}) at step {step}; saved")
            if ctx.is_global_leader:
                ctx.requeue(f"{ctx.stop.signal_name or 'signal'} at step {step}: time limit or preemption")
            dist.destroy_process_group()
            return {"stopped_at": step}
    save()
    if ctx.is_global_leader:
        state["done"] = True
        write_json_atomic(state_file, state)
    dist.destroy_process_group()
    return {"step": step, "total": total}
