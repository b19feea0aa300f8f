"""`MonitorConfig`: every knob of the health monitor in one typed dataclass, and the one place
they are defined.

The job config embeds it as its ``monitoring:`` section (`tulu.config.job.JobConfig.monitoring`;
the YAML keys are these field names). At submission the launch layer fills in what the job
decides (``log_globs``, ``max_learned_s``, an absolute ``fallback_dir``) with
`dataclasses.replace`, and the sidecar, the exit hook and the recovery policy read the result;
it travels to the batch script as JSON (``--config-json``), so it stays plain data and imports
nothing from tulu.

Defaults suit the tiny CPU runs and are safe on a cluster: the first attempt of a phase gets
``phase_timeouts_s[phase]`` or ``default_timeout_s``; once phases have been observed, learned
time-outs (5x the longest observed interval, as NVRx) take over. The presets set generous
``phase_timeouts_s`` for 405B phases.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["COLLECTIVE_MARGIN_S", "MonitorConfig", "MonitorConfigError"]

COLLECTIVE_MARGIN_S = 120.0
"""At least this much longer than the monitor's longest time-out: its check interval, the stack
dump and the requeue decision happen in it."""


class MonitorConfigError(ValueError):
    """A monitor setting out of range; ``field`` is its name (the job config reports
    ``monitoring.<field>``)."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"monitoring.{field}: got {value!r}; allowed: {allowed}")


@dataclass(kw_only=True, slots=True)
class MonitorConfig:
    """How the monitor decides that a job is hung, and what it does about it.

    Time-out resolution for a phase: once a phase has been observed ``min_observations`` times
    (and ``learn_timeouts`` is on) its time-out is ``max(min_learned_timeout_s, safety_factor x
    the longest observed duration)``; before that it is ``phase_timeouts_s[phase]`` or
    ``default_timeout_s``. The same rule learns the stall time-out from the longest observed
    gap between step completions. A learned time-out never exceeds ``max_learned_s`` (set by the
    job to its longest configured time-out, which its process groups' own time-outs outlast).
    """

    enabled: bool = True                   # false: submit without the sidecar and the EXIT trap
    check_interval_s: float = 5.0
    default_timeout_s: float = 600.0
    phase_timeouts_s: dict[str, float] = field(default_factory=dict)
    stall_timeout_s: float = 1800.0
    startup_timeout_s: float = 3600.0      # from sidecar start until every rank has reported
    learn_timeouts: bool = True
    safety_factor: float = 5.0             # NVRx: 5x the longest observed interval
    min_learned_timeout_s: float = 60.0
    max_learned_s: float | None = None     # cap, set by the job: its collective time-outs outlast it
    min_observations: int = 3
    max_restarts: int = 3                  # fault requeues per job (time-limit/preemption ones are not counted)
    exclude_culprit_node: bool = True      # a requeue excludes the node that hung or crashed
    log_globs: list[str] = field(default_factory=list)  # rank logs scanned for NCCL verdicts (set by the job)
    stack_wait_s: float = 3.0              # how long to wait for faulthandler dumps
    use_py_spy: bool = True
    agent_wait_s: float = 15.0             # how long the sidecar waits for a node agent's stacks
    act: bool = True                       # False: report only (never requeue or cancel)
    kill_ranks_on_fault: bool = False      # without Slurm: SIGKILL local ranks after the report
    sidecar_wait_s: float = 30.0           # on_exit waits this long for a busy sidecar
    # Where the monitor writes when the run folder cannot be written (full, over quota,
    # read-only): <fallback_dir>/job_<id>/; None: $TMPDIR/tulu-monitor-<uid>/ on the batch host
    fallback_dir: str | None = None
    on_storage_fault: Literal["stop", "hold"] = "stop"  # never requeue into a full file system

    def __post_init__(self) -> None:
        for name in ("check_interval_s", "default_timeout_s", "stall_timeout_s", "startup_timeout_s",
                     "min_learned_timeout_s"):
            if getattr(self, name) <= 0:
                raise MonitorConfigError(name, getattr(self, name), "> 0")
        if self.safety_factor < 1:
            # a time-out shorter than an observed healthy phase would fire on healthy runs
            raise MonitorConfigError("safety_factor", self.safety_factor, ">= 1")
        if self.max_restarts < 0:
            raise MonitorConfigError("max_restarts", self.max_restarts, "an integer >= 0")
        if self.min_observations < 1:
            raise MonitorConfigError("min_observations", self.min_observations, "an integer >= 1")
        if self.on_storage_fault not in ("stop", "hold"):
            raise MonitorConfigError("on_storage_fault", self.on_storage_fault, "'stop' or 'hold'")
        for phase, t in self.phase_timeouts_s.items():
            if t <= 0:
                raise MonitorConfigError(f"phase_timeouts_s.{phase}", t, "> 0")

    @property
    def longest_timeout_s(self) -> float:
        return max(self.default_timeout_s, self.stall_timeout_s, *self.phase_timeouts_s.values())

    @property
    def collective_timeout_s(self) -> float:
        """Time-out of every process group, bridge and store wait: longer than any time-out the
        monitor applies, plus a margin, so the monitor names a hang (culprit rank, stacks) before
        a collective gives up with a bare NCCL/gloo error."""
        longest = self.longest_timeout_s
        return longest + max(COLLECTIVE_MARGIN_S, 0.1 * longest)

    # ---- (de)serialisation: JSON on the command line, a dict from a YAML section ----
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "MonitorConfig":
        data = dict(data or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown monitor config key(s) {unknown}; valid keys: {valid}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | None) -> "MonitorConfig":
        return cls.from_dict(json.loads(text) if text else {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def configured_timeout(self, phase: str) -> float:
        return float(self.phase_timeouts_s.get(phase, self.default_timeout_s))
