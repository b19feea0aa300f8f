"""The callable submitit pickles and every Slurm task runs: map the environment to a role,
then hand over to the job mode.

This module imports nothing heavy at the top: submitit unpickles the task *before* it installs
its USR2 handler, and a time-limit warning that lands while torch is still importing would
kill the task outright (seen on the local cluster under load)."""

from __future__ import annotations

import atexit
import importlib
import os
import resource
import sys
import time
from pathlib import Path

MODES = {
    "rehearse": "tulu.modes.rehearse",
    "counter": "tulu.modes.counter",
    "train": "tulu.modes.train",
}


class JobTask:
    def __init__(self, cfg_dict: dict, run_dir: str):
        self.cfg_dict = cfg_dict
        self.run_dir = run_dir

    def __call__(self):
        from pathlib import Path

        from tulu.config.job import config_from_dict
        from tulu.launch import task_env
        from tulu.launch.context import JobContext
        from tulu.plan.layout import build_plan
        from tulu.launch.stop import StopRequest

        stop = StopRequest().install()
        _drop_stale_result_temp()
        from tulu.launch import local_peers

        local_peers.start()   # a local task whose peer failed stops (srun --kill-on-bad-exit's job)

        cfg = config_from_dict(self.cfg_dict)
        env = task_env.current()
        if env.cluster == "local":
            _as_a_slurm_task(cfg)
        plan = build_plan(cfg)
        if env.world_size != plan.world_size:
            raise RuntimeError(f"Slurm started {env.world_size} tasks but the plan needs {plan.world_size} "
                               f"({plan.nodes} nodes x {plan.gpus_per_node}); check the sbatch script")
        role = plan.role_of(env.global_rank)
        malloc = _tune_host_memory()
        ctx = JobContext(cfg, plan, role, env, stop, Path(self.run_dir))
        ctx.progress = _progress_tracker(ctx)
        ctx.fault_point("start", 0)   # before the rendezvous: the peers wait there for this rank
        ctx.log(f"job {env.job_id} attempt {env.restart_count} on node {env.node} ({env.hostname}), "
                f"mode {cfg.mode}, role {role.role} rank {role.role_rank}/{role.role_world_size} "
                f"tp {role.tp_rank} pp {role.pp_rank} dp {role.dp_rank} bridge {role.bridge_rank}, "
                f"{_threads()} threads")
        ctx.log(malloc)
        started = time.time()
        result = importlib.import_module(MODES[cfg.mode]).run(ctx)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB
        ctx.log(f"finished mode {cfg.mode} in {time.time() - started:.1f} s (peak RSS {peak_mb:.0f} MB): {result}")
        if ctx.progress is not None:
            ctx.progress.exit(0)
        atexit.register(_exit_without_teardown)
        return result

    def checkpoint(self, *args, **kwargs):
        # submitit calls this only if our USR2 handler was not installed yet (the signal arrived
        # during start-up): requeue the same task; it resumes from its last committed checkpoint.
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _drop_stale_result_temp() -> Path | None:
    """Delete this task's ``<job>_<task>_result.pkl.save_tmp`` left by an earlier attempt; the path
    if there was one. A task SIGKILLed while submitit saved its result (a requeue's kill landing
    in the error dump of a rank whose peer had just died) leaves it, and submitit refuses to save
    over it: every later attempt of that task then failed at its very end ("A temporary saved
    file already exists") and burned the restart budget (seen in the suite's five-fault run).
    Only this task writes its result, so a temp file there at its start is stale."""
    try:
        import submitit

        result = submitit.JobEnvironment().paths.result_pickle
    except Exception:  # noqa: BLE001 - not in a submitit task
        return None
    stale = result.with_suffix(result.suffix + ".save_tmp")
    try:
        stale.unlink()
    except OSError:
        return None
    print(f"removed {stale}, a result an earlier attempt of this task did not finish saving", flush=True)
    return stale


def _exit_without_teardown() -> None:
    """Registered once the mode has returned, so it runs first at interpreter exit: when submitit
    has stored this task's successful result, exit 0 without the C++ teardown of torch.distributed and
    Megatron, which took 1.5-2.5 s at the end of every job (no Python frame in it, 2 busy cores).
    Anything else (no result or an error stored, not a submitit task) exits the usual way."""
    import logging

    try:
        import submitit
        from submitit.core.utils import pickle_load

        stored = submitit.JobEnvironment().paths.result_pickle
        succeeded = stored.exists() and pickle_load(stored)[0] == "success"
    except Exception:  # not in a submitit task (e.g. called in-process)
        return
    if not succeeded:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _tune_host_memory() -> str:
    import torch

    from tulu.launch.host_memory import tune_for_cpu_job

    return tune_for_cpu_job(on_gpu=torch.cuda.is_available())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _as_a_slurm_task(cfg) -> None:
    """A local-executor task: the environment a Slurm task gets from the sbatch script
    (`executor.task_environment`: cpus_per_task threads, the job's `cluster.env`, ...). Without it
    every rank took all the cores (2 ranks x 2 threads on 2 cores) and did its sums in another
    order than under Slurm, so the same seed trained another model."""
    from tulu.launch.executor import apply_environment, run_paths, task_environment

    apply_environment(task_environment(cfg, run_paths(cfg)))


def _progress_tracker(ctx: JobContext):
    if not ctx.cfg.monitoring.enabled:
        return None
    try:
        from monitoring.progress import ProgressTracker
        from monitoring.record import monitor_session
    except ImportError:
        return None
    # Slurm's node name, not the host name: the recovery policy excludes nodes by that name.
    return ProgressTracker(str(ctx.monitor_dir), ctx.env.global_rank, ctx.env.world_size, role=ctx.role.role,
                           attempt=ctx.env.restart_count, node=ctx.env.hostname,
                           session=monitor_session() or "")
