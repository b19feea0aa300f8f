"""Detection rules as a deterministic function of record snapshots and a clock.

`Detector.check(records, now, alive)` returns the faults visible in one snapshot. It never
reads files, clocks or processes itself (the sidecar passes them in), so every rule is unit
tested with fake records and a fake clock.

Rules, in the order they are reported:
- **crash**: a rank recorded a failure (non-zero exit, uncaught exception), or its pid is gone
  while its record still says "running" (``alive[rank] is False``; the sidecar can tell only
  for ranks on its own host).
- **hang**: a rank has been inside one phase longer than that phase's time-out.
- **stall**: no rank finished a step for the stall time-out while some rank is between phases
  (the code the phase rule cannot see: a data loader, an un-instrumented wait).
- **startup**: some ranks never reported within ``startup_timeout_s`` of the sidecar's start.

Time-outs are learned (NVRx style): once a phase has been seen ``min_observations`` times its
time-out becomes ``max(min_learned_timeout_s, safety_factor x longest observed)``. So a checkpoint
that always takes 4 minutes gets a 20-minute time-out, and a straggler whose phases are slow
but finish raises the learned time-outs instead of tripping them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitoring.config import MonitorConfig
from monitoring.record import STATE_EXITED, STATE_FAILED, STATE_RUNNING, RankRecord

__all__ = ["Fault", "Detector", "STEP_GAP"]

STEP_GAP = "(step)"   # pseudo-phase: the time between two step completions (stall rule)


@dataclass(frozen=True, slots=True)
class Fault:
    """One rule that fired. ``ranks`` tripped the rule; the culprits are named by diagnosis."""

    kind: str                  # "crash" | "hang" | "stall" | "startup"
    ranks: tuple[int, ...]
    phase: str = ""
    step: int = -1
    elapsed_s: float = 0.0
    timeout_s: float = 0.0
    timeout_source: str = ""   # "configured" | "learned"
    detail: str = ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ranks": list(self.ranks), "phase": self.phase,
                "step": self.step, "elapsed_s": round(self.elapsed_s, 3),
                "timeout_s": round(self.timeout_s, 3), "timeout_source": self.timeout_source,
                "detail": self.detail}


@dataclass(slots=True)
class Detector:
    """Rule state across snapshots: learned durations and the last time anything progressed."""

    cfg: MonitorConfig
    world_size: int
    attempt: int
    start_time: float
    observed: dict[str, tuple[float, int]] = field(default_factory=dict)  # phase: (longest, n)
    last_progress: float = -1.0
    _progress_sig: tuple = ()
    finished: bool = False     # every rank exited cleanly: the sidecar can stop

    def __post_init__(self) -> None:
        if self.last_progress < 0:
            self.last_progress = self.start_time

    # ---- time-outs -------------------------------------------------------------------
    def timeout_for(self, phase: str) -> tuple[float, str]:
        """(time-out in seconds, "learned" | "configured") for ``phase``."""
        cfg = self.cfg
        seen = self.observed.get(phase)
        if cfg.learn_timeouts and seen and seen[1] >= cfg.min_observations:
            learned = max(cfg.min_learned_timeout_s, cfg.safety_factor * seen[0])
            # the job's collectives give up after the longest configured time-out (+ a margin):
            # a learned time-out beyond it would let them fail before the monitor decides
            return (min(learned, cfg.max_learned_s) if cfg.max_learned_s else learned), "learned"
        if phase == STEP_GAP:
            return cfg.stall_timeout_s, "configured"
        return cfg.configured_timeout(phase), "configured"

    def learned_timeouts(self) -> dict[str, float]:
        return {p: self.timeout_for(p)[0] for p in sorted(self.observed)
                if self.timeout_for(p)[1] == "learned"}

    def _learn(self, records: list[RankRecord]) -> None:
        for r in records:
            merged = dict(r.phase_stats)
            if r.n_steps >= 2:
                merged[STEP_GAP] = (r.max_step_gap, r.n_steps - 1)
            for phase, (longest, n) in merged.items():
                old = self.observed.get(phase, (0.0, 0))
                self.observed[phase] = (max(old[0], longest), max(old[1], n))

    # ---- the rules -------------------------------------------------------------------
    def check(self, records: list[RankRecord | None], now: float,
              alive: dict[int, bool | None] | None = None) -> list[Fault]:
        """Faults visible at ``now``. ``records[r]`` is rank r's record or None;
        ``alive[r]`` is False when rank r's pid is known to be gone."""
        alive = alive or {}
        current = [r if (r is not None and r.attempt == self.attempt) else None for r in records]
        present = [r for r in current if r is not None]
        self._learn(present)
        faults: list[Fault] = []

        failed = [r for r in present if r.state == STATE_FAILED]
        vanished = [r for r in present if r.state == STATE_RUNNING and alive.get(r.rank) is False]
        if failed or vanished:
            bad = sorted({r.rank for r in failed + vanished})
            parts = [f"rank {r.rank} on {r.host} exited with code {r.exit_code}"
                     + (f" ({r.error})" if r.error else "") for r in failed]
            parts += [f"rank {r.rank} (pid {r.pid} on {r.host}) is gone without recording an "
                      f"exit (killed?)" for r in vanished]
            faults.append(Fault("crash", tuple(bad), detail="; ".join(parts)))

        if len(present) == self.world_size and all(r.state == STATE_EXITED for r in present):
            self.finished = True
            return faults

        running = [r for r in present if r.state == STATE_RUNNING and alive.get(r.rank) is not False]
        worst: tuple[float, str, float, str] | None = None
        hung: list[RankRecord] = []
        for r in running:
            if not r.phase:
                continue
            timeout, source = self.timeout_for(r.phase)
            elapsed = now - r.phase_start
            if elapsed > timeout:
                hung.append(r)
                if worst is None or elapsed / timeout > worst[0] / worst[2]:
                    worst = (elapsed, r.phase, timeout, source)
        if hung and worst is not None:
            elapsed, phase, timeout, source = worst
            in_phase = [r for r in hung if r.phase == phase]
            step = max(r.phase_step for r in in_phase)
            faults.append(Fault(
                "hang", tuple(sorted(r.rank for r in hung)), phase=phase, step=step,
                elapsed_s=elapsed, timeout_s=timeout, timeout_source=source,
                detail=f"{len(in_phase)} rank(s) inside phase {phase!r} (step {step}) for "
                       f"{elapsed:.1f} s > {source} time-out {timeout:.1f} s"))

        sig = tuple((r.rank, r.done_step) for r in present)
        if sig != self._progress_sig:
            # When did the newest step finish? (The ranks' clock, not when we looked: a sidecar
            # that starts or polls late must not shift the stall window.)
            self._progress_sig = sig
            newest = max([self.start_time] + [r.done_time for r in present])
            self.last_progress = min(now, max(self.last_progress, newest))
        stall_timeout, stall_source = self.timeout_for(STEP_GAP)
        idle = now - self.last_progress
        # Ranks inside an open phase are the phase rule's business; the stall rule covers the
        # code between phases (a rank stuck in a data loader, an un-instrumented wait).
        # Until every rank has reported, the startup rule owns the silence.
        between = [r for r in running if not r.phase]
        if between and idle > stall_timeout and not hung and len(present) == self.world_size:
            step = max(r.done_step for r in present)
            faults.append(Fault(
                "stall", tuple(r.rank for r in running), phase="", step=step, elapsed_s=idle,
                timeout_s=stall_timeout, timeout_source=stall_source,
                detail=f"no rank finished a step for {idle:.1f} s > {stall_source} stall "
                       f"time-out {stall_timeout:.1f} s (last finished step {step})"))

        missing = [i for i, r in enumerate(current) if r is None]
        if missing and now - self.start_time > self.cfg.startup_timeout_s:
            faults.append(Fault(
                "startup", tuple(missing), elapsed_s=now - self.start_time,
                timeout_s=self.cfg.startup_timeout_s, timeout_source="configured",
                detail=f"{len(missing)} rank(s) never reported progress within "
                       f"{self.cfg.startup_timeout_s:.0f} s of start: {_ranges(missing)}"))
        return faults


def _ranges(ranks: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5' (256-rank jobs make long lists)."""
    out, start, prev = [], None, None
    for r in sorted(ranks):
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = r
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)
