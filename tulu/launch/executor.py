"""Build the submitit executor from a config and its rank plan; submit; remember the job.

Folders of a run (`run.dir`, default `runs/<name>`):
  logs/<job_id>/<job_id>_<task>_log.{out,err}   per-task logs, appended across requeues
  monitor/                                      heartbeats, hang reports, requeue decisions
  checkpoints/                                  committed checkpoints
The job index `${TULU_HOME:-~/.tulu}/jobs/<job_id>.json` maps a job id back to its run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from monitoring.config import MonitorConfig

from tulu.atomic import write_text_atomic
from tulu.config.job import ConfigError, JobConfig
from tulu.launch.task import JobTask
from tulu.plan.layout import RankPlan


@dataclass(frozen=True, slots=True)
class RunPaths:
    run_dir: Path

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def monitor(self) -> Path:
        return self.run_dir / "monitor"

    def job_logs(self, job_id: str) -> Path:
        return self.logs / str(job_id)


def run_paths(cfg: JobConfig) -> RunPaths:
    return RunPaths(cfg.run_dir.resolve())


def task_environment(cfg: JobConfig, paths: RunPaths) -> dict[str, str]:
    """Exports for every task: NCCL/torch settings that make hangs diagnosable, not silent."""
    env = {
        "TULU_RUN_DIR": str(paths.run_dir),
        "OMP_NUM_THREADS": str(cfg.cluster.cpus_per_task),
        "PYTHONUNBUFFERED": "1",
        # Megatron's TP communication overlap needs ordered kernel queues.
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        # Keep NCCL's own watchdog on (Ai2 turned it off); the sidecar reads its verdicts and the
        # flight recorder dump tells which collective each rank was in.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(paths.monitor / "nccl_trace_rank_"),
        "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": str(paths.monitor / "nccl_pipe_rank_"),
        "NCCL_DEBUG": "WARN",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update(cfg.cluster.env)
    return env


def setup_lines(cfg: JobConfig, plan: RankPlan, paths: RunPaths) -> list[str]:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in task_environment(cfg, paths).items()]
    lines.append(f"mkdir -p {shlex.quote(str(paths.monitor))}")
    if cfg.monitoring.enabled:
        # A job without its monitor runs without hang detection and without the EXIT trap that
        # requeues a crash: never submit one by accident (monitoring.enabled: false says so).
        try:
            from monitoring.recovery import setup_lines as monitor_setup_lines
        except ImportError as e:
            raise ConfigError("monitoring.enabled", f"the health monitor cannot be imported ({e}); the job would "
                              "run without hang detection or crash requeues. Fix the install (monitoring/ "
                              "next to tulu/), or set monitoring.enabled: false to run without it") from e
        lines += monitor_setup_lines(str(paths.monitor), plan.world_size,
                                     monitor_settings(cfg), train_nodes=cfg.cluster.nodes,
                                     spare_nodes=cfg.cluster.spare_nodes)
    return lines


def monitor_settings(cfg: JobConfig) -> MonitorConfig:
    """The job's `monitoring:` section plus what the job decides: the rank logs to scan, the
    cap on learned time-outs (its longest configured one, which the collectives outlast) and an
    absolute fallback folder (the batch host's cwd is not the submitter's)."""
    m = cfg.monitoring
    return dataclasses.replace(
        m,
        max_learned_s=m.longest_timeout_s,
        log_globs=[str(run_paths(cfg).logs / "{job_id}" / "*_log.*")],
        fallback_dir=str(Path(m.fallback_dir).expanduser().resolve()) if m.fallback_dir else None,
    )


def dependency_parameters(after_ok: str | None) -> dict:
    """Start only after job `after_ok` completed; cancelled by Slurm if that job fails (a failed
    stage must not leave the rest of a pipeline pending forever)."""
    return {"dependency": f"afterok:{after_ok}", "kill_on_invalid_dep": "yes"} if after_ok else {}


class SpareNodesExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor whose training ``srun`` runs in the monitor's step loop
    (``cluster.spare_nodes`` > 0, `monitoring.recovery.step_loop_lines`): the job allocates
    ``nodes + spare_nodes`` nodes, each step runs on ``nodes`` of them, and an in-job restart
    starts the next step on a spare instead of requeueing."""

    def __init__(self, *args, monitor_dir: Path, train_nodes: int, tasks_per_node: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop = dict(monitor_dir=str(monitor_dir), nodes=train_nodes, tasks_per_node=tasks_per_node)

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        from monitoring.recovery import step_loop_lines

        lines = super()._make_submission_file_text(command, uid).split("\n")
        at = [i for i, line in enumerate(lines) if line.startswith("srun ")]
        if not at:
            raise RuntimeError("submitit's sbatch script has no srun line to put in the step loop")
        i = at[-1]
        lines[i:i + 1] = step_loop_lines(lines[i], self._loop["monitor_dir"], nodes=self._loop["nodes"],
                                         tasks_per_node=self._loop["tasks_per_node"])
        return "\n".join(lines)


def make_executor(cfg: JobConfig, plan: RankPlan, paths: RunPaths, after_ok: str | None = None) -> submitit.Executor:
    cl = cfg.cluster
    folder = paths.logs / "%j"
    if cl.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(nodes=1, tasks_per_node=cl.gpus_per_node, timeout_min=cl.time_limit_min,
                             gpus_per_node=0)
        return ex
    if cl.spare_nodes:
        ex = SpareNodesExecutor(folder=folder, python=shlex.quote(sys.executable), max_num_timeout=1000,
                                monitor_dir=paths.monitor, train_nodes=cl.nodes, tasks_per_node=cl.gpus_per_node)
    else:
        ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable), max_num_timeout=1000)
    params = dict(
        job_name=cfg.run.name,
        nodes=cl.nodes + cl.spare_nodes,   # the training step runs on cl.nodes of them
        ntasks_per_node=cl.gpus_per_node,
        cpus_per_task=cl.cpus_per_task,
        time=cl.time_limit_min,
        signal_delay_s=cl.signal_delay_s,
        setup=setup_lines(cfg, plan, paths),
        # A task that dies takes the step down at once, instead of its peers hanging in a
        # collective; the EXIT trap then decides about the requeue.
        srun_args=["--kill-on-bad-exit=1"],
        additional_parameters={"requeue": True, **dependency_parameters(after_ok)},
    )
    if cl.request_gpus:
        params["gpus_per_node"] = cl.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cl, key):
            params[key] = getattr(cl, key)
    if cl.exclusive:
        params["exclusive"] = True
    if cl.mem_gb:
        params["mem"] = f"{int(cl.mem_gb)}GB"
    ex.update_parameters(**params)
    return ex


def sbatch_script(cfg: JobConfig, plan: RankPlan) -> str:
    paths = run_paths(cfg)
    ex = make_executor(cfg, plan, paths)
    if not isinstance(ex, submitit.SlurmExecutor):
        raise ValueError("cluster.executor is 'local': there is no sbatch script")
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def tulu_home() -> Path:
    return Path(os.environ.get("TULU_HOME", Path.home() / ".tulu"))


def record_job(job_id: str, cfg: JobConfig, paths: RunPaths, config_path: str | None) -> Path:
    rec = {"job_id": job_id, "run_dir": str(paths.run_dir), "log_dir": str(paths.job_logs(job_id)),
           "monitor_dir": str(paths.monitor), "config_path": config_path, "submitted": time.time(),
           "executor": cfg.cluster.executor, "config": cfg.to_dict()}
    out = tulu_home() / "jobs" / f"{job_id}.json"
    write_text_atomic(out, json.dumps(rec, indent=1))
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    with open(paths.run_dir / "jobs.jsonl", "a") as f:
        f.write(json.dumps({k: rec[k] for k in ("job_id", "submitted", "config_path")}) + "\n")
    return out


def find_job(job_id: str) -> dict:
    f = tulu_home() / "jobs" / f"{job_id}.json"
    if not f.exists():
        raise FileNotFoundError(f"job {job_id} was not submitted through tulu on this machine "
                                f"(no {f}); pass the run folder instead")
    return json.loads(f.read_text())


def submit(cfg: JobConfig, plan: RankPlan, config_path: str | None = None,
           after_ok: str | None = None) -> submitit.Job:
    """Submit the job; with `after_ok` it waits in the queue until that job has completed."""
    paths = run_paths(cfg)
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.monitor.mkdir(parents=True, exist_ok=True)
    (paths.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    ex = make_executor(cfg, plan, paths, after_ok)
    job = ex.submit(JobTask(cfg.to_dict(), str(paths.run_dir)))
    record_job(str(job.job_id), cfg, paths, config_path)
    return job


def apply_environment(env: dict[str, str]) -> None:
    """In a local-executor process: the environment the Slurm path exports before Python starts,
    and the threads it asks for (torch reads OMP_NUM_THREADS when it starts, maybe already)."""
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))


def _call_in_environment(env: dict[str, str], fn, *args):
    """A local-executor job: ``fn(*args)`` with the environment the Slurm path exports first."""
    apply_environment(env)
    return fn(*args)


def submit_call(fn, *args, name: str, run_dir: Path, cluster, after_ok: str | None = None) -> submitit.Job:
    """A one-task job running ``fn(*args)`` (a pipeline's data, pairs or evaluation step), with the
    cluster settings of `cluster` (a ClusterConfig) and logs in ``run_dir/logs/<job_id>/``."""
    folder = Path(run_dir) / "logs" / "%j"
    # one thread per core we asked for: a tiny model gains nothing from more and oversubscribed
    # cores stall sampling (12 vs 183 samples/s seen on 2 busy cores); plus the job's own
    # environment (e.g. HF_HUB_CACHE/HF_HUB_OFFLINE), as its tasks get it
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cluster.cpus_per_task),
           **cluster.env}
    if cluster.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=cluster.time_limit_min)
        return ex.submit(_call_in_environment, env, fn, *args)
    ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable))
    params = dict(job_name=name, nodes=1, ntasks_per_node=1, cpus_per_task=cluster.cpus_per_task,
                  time=cluster.time_limit_min, setup=[f"export {k}={shlex.quote(v)}" for k, v in env.items()],
                  additional_parameters=dependency_parameters(after_ok))
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    ex.update_parameters(**params)
    return ex.submit(fn, *args)
