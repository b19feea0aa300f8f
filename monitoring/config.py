"""`MonitorConfig`: every knob of the health monitor in one typed dataclass.

The sidecar, the exit hook and the recovery policy all read the same config; it travels from
`tulu submit` to the batch script as JSON (``--config-json``), so it must stay plain data.

Defaults are for a real cluster (NVRx-like: check every 5 s, learned time-outs at 5x the longest
observed phase). Tests use time-outs of a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MonitorConfig"]


def _default_phase_timeouts() -> dict[str, float]:
    # Phases that are legitimately long on a 405B run get generous first-attempt limits; once
    # durations have been observed, learned time-outs take over (see `MonitorConfig`).
    return {
        "setup": 3600.0,       # model load, process-group init, first compile
        "checkpoint": 3600.0,  # a 405B save can take many minutes
        "generate": 3600.0,    # long generation tails
        "train": 3600.0,
        "weight_sync": 1200.0,
    }


@dataclass(kw_only=True, slots=True)
class MonitorConfig:
    """How the monitor decides that a job is hung, and what it does about it.

    Time-out resolution for a phase: once a phase has been observed ``min_observations`` times
    (and ``learn_timeouts`` is on) its time-out is ``max(min_learned_s, safety_factor x the
    longest observed duration)``; before that it is ``phase_timeouts_s[phase]`` or
    ``default_timeout_s``. The same rule learns the stall time-out from the longest observed
    gap between step completions. A learned time-out never exceeds ``max_learned_s`` (set by the
    job to its longest configured time-out, which its process groups' own time-outs outlast).
    """

    check_interval_s: float = 5.0
    phase_timeouts_s: dict[str, float] = field(default_factory=_default_phase_timeouts)
    default_timeout_s: float = 1800.0
    stall_timeout_s: float = 3600.0
    startup_timeout_s: float = 3600.0      # from sidecar start until every rank has reported
    learn_timeouts: bool = True
    safety_factor: float = 5.0             # NVRx: 5x the longest observed interval
    min_learned_s: float = 120.0
    max_learned_s: float | None = None     # cap: the job's collective time-outs outlast it
    min_observations: int = 3
    restart_budget: int = 5                # fault requeues per job (Slurm's own are not counted)
    exclude_culprit_nodes: bool = True
    log_globs: list[str] = field(default_factory=list)  # rank logs scanned for NCCL verdicts
    stack_wait_s: float = 3.0              # how long to wait for faulthandler dumps
    use_py_spy: bool = True
    act: bool = True                       # False: report only (never requeue or cancel)
    kill_ranks_on_fault: bool = False      # without Slurm: SIGKILL local ranks after the report
    sidecar_wait_s: float = 30.0           # on_exit waits this long for a busy sidecar
    # Where the monitor writes when the monitor dir cannot be written (full, over quota,
    # read-only): <fallback_dir>/job_<id>/; None: $TMPDIR/tulu-monitor-<uid>/ on the batch host
    fallback_dir: str | None = None
    on_storage_fault: str = "stop"         # "stop" (exit 79) | "hold" (requeued held)

    def __post_init__(self) -> None:
        positive = ("check_interval_s", "default_timeout_s", "stall_timeout_s",
                    "startup_timeout_s", "safety_factor", "min_learned_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"MonitorConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.safety_factor < 1:
            raise ValueError("MonitorConfig.safety_factor must be >= 1 (a time-out shorter than "
                             f"an observed healthy phase would fire on healthy runs), got "
                             f"{self.safety_factor}")
        if self.restart_budget < 0 or self.min_observations < 1:
            raise ValueError("MonitorConfig.restart_budget must be >= 0 and min_observations >= 1")
        if self.on_storage_fault not in ("stop", "hold"):
            raise ValueError(f"MonitorConfig.on_storage_fault must be 'stop' or 'hold', got "
                             f"{self.on_storage_fault!r}")
        for phase, t in self.phase_timeouts_s.items():
            if t <= 0:
                raise ValueError(f"MonitorConfig.phase_timeouts_s[{phase!r}] must be > 0, got {t}")

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
