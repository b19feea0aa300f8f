"""Run a function in N real gloo processes on this machine and collect what each rank returns.

    from tests.dist_helpers import run_distributed

    def _ranks_agree(rank, world_size, value):      # module level: it is pickled by reference
        t = torch.tensor([value + rank])
        torch.distributed.all_reduce(t)
        return t.item()

    assert run_distributed(_ranks_agree, 2, 10) == [21, 21]

Each child process gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set, a default
gloo process group already initialised (``init_process_group=False`` to skip), and is called as
``fn(rank, world_size, *args, **kwargs)``. Results come back in rank order (they must pickle).

If any rank raises, every process is stopped and a :class:`DistributedTestError` names the
failing rank(s) with their tracebacks; if the ranks do not finish within ``timeout`` seconds
(a hang in a collective, usually), the error says which ranks had not returned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

__all__ = ["DistributedTestError", "free_port", "job_task", "random_job_id", "run_distributed"]


class DistributedTestError(RuntimeError):
    """One or more ranks of a :func:`run_distributed` call failed, hung or died."""


def free_port() -> int:
    """A TCP port that is free on localhost right now, below the ephemeral range.

    A port the OS picks (bind to 0) is an ephemeral one: between this check and the rendezvous
    binding it, any process's outgoing connection may take it (EADDRINUSE seen in CI). Ports in
    10000..19999 are below the ephemeral range and below the jobs' own (TaskEnv.port_base)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 20000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 10000..19999")


def _child(fn, rank, world_size, port, init_pg, env, results, args, kwargs):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(1)  # N processes share a few cores; oversubscription is slow
        if init_pg:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
            )
        out = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


# Children fork from one server process that has imported these once (per pytest process): a
# spawned child paid ~5 s importing torch and Megatron on 2 cores, every rank of every test.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.dist_checkpointing",
           "transformers"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # a missing module is skipped by multiprocessing
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    init_process_group: bool = True,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` fresh processes.

    Returns the list of return values, index = rank. Raises :class:`DistributedTestError` with
    the failing ranks' tracebacks if a rank raises, dies without reporting, or the whole run
    exceeds ``timeout`` seconds. ``fn`` must be importable (defined at module level).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, port, init_process_group, dict(env or {}), results,
                  args, kwargs),
            daemon=True,
            name=f"rank{r}",
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()

    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while len(outputs) + len(failures) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                pending = [r for r in range(world_size) if r not in outputs and r not in failures]
                dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode != 0]
                for r in dead:
                    # Give a late queue message a moment before calling the rank dead.
                    try:
                        rank, ok, payload = results.get(timeout=1.0)
                    except queue.Empty:
                        failures[r] = f"process died with exit code {procs[r].exitcode} " \
                                      "without reporting (killed, or crashed in C code)"
                        continue
                    (outputs if ok else failures)[rank] = payload
                if failures:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    raise DistributedTestError(
                        f"{fn.__name__} on {world_size} ranks timed out after {timeout:.0f} s; "
                        f"ranks that never returned: {pending} (a hang in a collective, or "
                        f"too little time for this machine). Finished: {sorted(outputs)}; "
                        f"failed: {sorted(failures)}."
                    )
                continue
            if ok:
                outputs[rank] = payload
            else:
                failures[rank] = payload
                break  # the others would hang in their next collective; report now
    finally:
        for p in procs:
            p.join(timeout=0.5 if failures or timed_out else 5.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()

    if failures:
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())]
        raise DistributedTestError(
            f"{fn.__name__} failed on rank(s) {sorted(failures)} of {world_size}:\n"
            + "\n".join(parts)
        )
    return [outputs[r] for r in range(world_size)]


def random_job_id() -> str:
    """A job id for an in-process job: its rendezvous ports come from it (TaskEnv.port_base)."""
    return str(random.randrange(1500))


def job_task(rank, world_size, cfg_dict, job_id, stop_after_steps=None):
    """One task of a job (``tulu.modes.train.run``) with a JobContext like the Slurm task's (local
    cluster); with ``stop_after_steps`` the job stops as if preempted during that step: the ranks
    agree on the stop after it. Run it through :func:`run_distributed` with
    ``init_process_group=False`` (the job forms its own groups)."""
    # Megatron's checkpoint writer and the verifier pool fork; run_distributed's children are
    # daemonic, which forbids that (Slurm tasks are not): lift the flag in the test harness.
    mp.current_process()._config["daemon"] = False
    from tulu.config.job import config_from_dict
    from tulu.modes.train import run
    from tulu.launch.context import JobContext
    from tulu.launch.task_env import TaskEnv
    from tulu.plan.layout import build_plan
    from tulu.launch.stop import StopRequest

    class StopAfter(StopRequest):
        def __init__(self, n):
            super().__init__()
            self.calls, self.n = 0, n

        def agree(self, group=None):
            self.calls += 1
            if self.calls == self.n:
                self.requested, self.signal_name = True, "SIGUSR2"
            return super().agree(group)

    cfg = config_from_dict(cfg_dict)
    plan = build_plan(cfg)
    env = TaskEnv(global_rank=rank, world_size=world_size, node=0, local_rank=rank, hostnames=("localhost",),
                  job_id=job_id, restart_count=0, cluster="local")
    stop = StopAfter(stop_after_steps) if stop_after_steps else StopRequest()
    return run(JobContext(cfg, plan, plan.role_of(rank), env, stop, cfg.run_dir))


def grpo_passes(policy, reference, objective, microbatches, seq_length):
    """One GRPO pass pair in a rank: the reference's log-probs into the micro-batches, then the
    policy's loss and backward. Returns (the loss function's stores, the flat gradient)."""
    import torch

    from tulu.train.rl_objectives import run_logits_schedule

    with torch.no_grad():
        run_logits_schedule(reference, microbatches, objective.logprob_fn("ref_logprobs"), seq_length=seq_length,
                            forward_only=True)
    policy.ddp.zero_grad_buffer()
    stores = run_logits_schedule(policy.ddp, microbatches, objective.loss_fn, seq_length=seq_length,
                                 forward_only=False)
    return stores, torch.cat([p.main_grad.reshape(-1).clone() for p in policy.ddp.parameters()])
