"""What every job mode receives: config, plan, this task's role, and the job's folders."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tulu.atomic import write_json_atomic  # noqa: F401  (kept importable here for older callers)
from tulu.config.job import JobConfig
from tulu.launch.task_env import TaskEnv
from tulu.plan.layout import RankPlan, RankRole
from tulu.launch.stop import StopRequest


@dataclass
class JobContext:
    cfg: JobConfig
    plan: RankPlan
    role: RankRole
    env: TaskEnv
    stop: StopRequest
    run_dir: Path
    progress: object | None = None  # monitoring.progress tracker when the monitor is on
    extras: dict = field(default_factory=dict)

    @property
    def monitor_dir(self) -> Path:
        return self.run_dir / "monitor"

    @property
    def is_global_leader(self) -> bool:
        return self.env.global_rank == 0

    def log(self, message: str) -> None:
        print(f"[tulu rank {self.env.global_rank} {self.role.role}:{self.role.role_rank}] {message}", flush=True)

    def phase(self, name: str, step: int):
        """Report a phase to the monitor; a no-op context when monitoring is off."""
        if self.progress is None:
            import contextlib

            return contextlib.nullcontext()
        return self.progress.phase(name, step)

    def step_done(self, step: int) -> None:
        if self.progress is not None:
            self.progress.step_done(step)

    def fault_point(self, point: str, step: int) -> None:
        """Fault injection hook (monitoring.faults); does nothing unless a fault is configured."""
        try:
            from monitoring import faults
        except ImportError:
            return
        faults.maybe_inject(point, step=step, rank=self.env.global_rank, restart=self.env.restart_count)

    def requeue(self, reason: str) -> None:
        """Ask for this job to run again after the ranks exit (global rank 0 only).

        The batch script's EXIT trap (monitoring.on_exit) performs the requeue once srun has
        returned, so ranks finish writing and exit cleanly, and a graceful stop never spends
        the crash restart budget."""
        if self.env.cluster != "slurm":
            self.log(f"not requeuing under the local executor ({reason})")
            return
        from monitoring.recovery import request_requeue

        request_requeue(str(self.monitor_dir), self.env.job_id, self.env.restart_count, reason)
        self.log(f"requeue of job {self.env.job_id} requested: {reason}")


def python() -> str:
    return sys.executable
