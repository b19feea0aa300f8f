"""Detection rules over fake records and a fake clock: what is a hang, a crash, a stall, and
what is merely slow."""

from __future__ import annotations

import dataclasses

import pytest

from monitoring.config import MonitorConfig
from monitoring.detect import STEP_GAP, Detector
from monitoring.record import STATE_EXITED, STATE_FAILED, STATE_RUNNING, RankRecord

CFG = MonitorConfig(check_interval_s=1, default_timeout_s=10, phase_timeouts_s={"checkpoint": 20},
                    stall_timeout_s=30, startup_timeout_s=60, min_learned_timeout_s=5, safety_factor=5,
                    min_observations=2)


def rec(rank, phase="train", step=3, start=100.0, done=2, **kw) -> RankRecord:
    base = dict(rank=rank, world_size=4, pid=1000 + rank, attempt=0, proc_start=0.0,
                host="h", node=f"n{rank}", role="", phase=phase, phase_step=step,
                phase_start=start, updated=start, done_step=done, done_time=start,
                max_step_gap=0.0, n_steps=0, state=STATE_RUNNING, exit_code=0, exit_time=0.0,
                error="", phase_stats={})
    base.update(kw)
    return RankRecord(**base)


def det(**kw) -> Detector:
    return Detector(dataclasses.replace(CFG, **kw) if kw else CFG, 4, 0, start_time=100.0)


def test_phase_open_longer_than_its_timeout_is_a_hang():
    d = det()
    records = [rec(r) for r in range(4)]
    assert d.check(records, 109.0) == []
    (fault,) = d.check(records, 111.0)
    assert fault.kind == "hang" and fault.phase == "train" and fault.ranks == (0, 1, 2, 3)
    assert fault.timeout_s == 10 and fault.timeout_source == "configured"


def test_per_phase_timeout_overrides_the_default():
    d = det()
    records = [rec(r, phase="checkpoint") for r in range(4)]
    assert d.check(records, 115.0) == []
    assert d.check(records, 121.0)[0].phase == "checkpoint"


def test_learned_timeout_lets_a_long_checkpoint_pass_but_still_catches_a_hang():
    d = det()
    stats = {"checkpoint": (8.0, 2)}           # two checkpoints seen, the longest 8 s
    records = [rec(r, phase="checkpoint", phase_stats=stats) for r in range(4)]
    assert d.timeout_for("checkpoint") == (20.0, "configured")
    assert d.check(records, 130.0) == []        # 30 s > configured 20 s, < learned 40 s
    assert d.timeout_for("checkpoint") == (40.0, "learned")
    assert d.check(records, 141.0)[0].timeout_source == "learned"


def test_learning_waits_for_min_observations_and_respects_min_learned():
    d = det()
    d.check([rec(r, phase_stats={"train": (0.1, 1)}) for r in range(4)], 100.0)
    assert d.timeout_for("train") == (10.0, "configured")
    d.check([rec(r, phase_stats={"train": (0.1, 2)}) for r in range(4)], 100.0)
    assert d.timeout_for("train") == (5.0, "learned")     # 5 x 0.1 s is below min_learned_timeout_s


def test_straggler_that_keeps_finishing_phases_is_not_reported():
    d = det()
    t = 100.0
    for step in range(10):   # every phase takes 8 s (slow), each below the 10 s time-out
        records = [rec(r, step=step, start=t, done=step - 1,
                       phase_stats={"train": (8.0, step)} if step else {}) for r in range(4)]
        assert d.check(records, t + 8.0) == [], step
        t += 8.0


def test_recorded_failure_is_a_crash_immediately():
    d = det()
    records = [rec(r) for r in range(4)]
    records[2] = rec(2, state=STATE_FAILED, exit_code=1, error="ValueError: boom")
    (fault,) = d.check(records, 100.5)
    assert fault.kind == "crash" and fault.ranks == (2,) and "ValueError" in fault.detail


def test_vanished_pid_is_a_crash_and_unknown_liveness_is_not():
    d = det()
    records = [rec(r) for r in range(4)]
    assert d.check(records, 101.0, alive={0: True, 1: None, 2: True, 3: True}) == []
    (fault,) = d.check(records, 101.0, alive={0: True, 1: None, 2: False, 3: True})
    assert fault.kind == "crash" and fault.ranks == (2,)


def test_no_step_progress_between_phases_is_a_stall():
    d = det()
    records = [rec(r, phase="", step=5, done=5) for r in range(4)]
    assert d.check(records, 120.0) == []
    (fault,) = d.check(records, 131.0)
    assert fault.kind == "stall" and fault.step == 5


def test_progress_resets_the_stall_clock():
    d = det()
    assert d.check([rec(r, phase="", done=5) for r in range(4)], 120.0) == []
    moved = [rec(r, phase="", done=6, done_time=125.0) if r == 0 else rec(r, phase="", done=5)
             for r in range(4)]
    assert d.check(moved, 126.0) == []
    assert d.check(moved, 150.0) == []          # 25 s since rank 0 finished step 6


def test_stall_timeout_is_learned_from_step_gaps():
    d = det()
    records = [rec(r, phase="", done=5, max_step_gap=20.0, n_steps=5) for r in range(4)]
    d.check(records, 100.0)
    assert d.timeout_for(STEP_GAP) == (100.0, "learned")


def test_ranks_that_never_report_trip_the_startup_timeout():
    d = det()
    records = [rec(0, phase="", done=-1), None, rec(2, phase="", done=-1), None]
    assert d.check(records, 150.0) == []
    faults = d.check(records, 161.0)
    assert [f.kind for f in faults] == ["startup"] and faults[0].ranks == (1, 3)


def test_records_from_a_previous_attempt_are_ignored():
    d = Detector(CFG, 2, attempt=1, start_time=100.0)
    old = [rec(0, attempt=0, state=STATE_FAILED, exit_code=1), rec(1, attempt=0)]
    assert d.check(old, 150.0) == []


def test_all_ranks_exited_cleanly_finishes():
    d = det()
    assert d.check([rec(r, state=STATE_EXITED) for r in range(4)], 500.0) == []
    assert d.finished


@pytest.mark.parametrize("bad", [dict(safety_factor=0.5), dict(check_interval_s=0),
                                 dict(phase_timeouts_s={"train": -1})])
def test_config_rejects_values_that_would_misfire(bad):
    with pytest.raises(ValueError):
        MonitorConfig(**bad)


def test_config_unknown_key_error_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys.*stall_timeout_s"):
        MonitorConfig.from_dict({"stall_timeout": 3})
    cfg = MonitorConfig.from_json(CFG.to_json())
    assert cfg == CFG
