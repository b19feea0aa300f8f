"""Which weights generate which step's rollouts (`tulu.rlvr.rollout_schedule`), and the config key
that sets how far ahead (`rlvr.async_steps`)."""

from __future__ import annotations

import pytest

from tulu.config.job import ConfigError, config_from_dict
from tulu.rlvr.rollout_schedule import RolloutSchedule


def _run(schedule: RolloutSchedule, first: int, last: int, stored: int = 0) -> dict[int, int]:
    """{rollout step: weights version} as the learner requests them over steps first..last-1
    (the first ``stored`` steps train on rollouts a checkpoint held)."""
    made: dict[int, int] = {}
    for step in range(first, last):
        for g in schedule.requests(step):
            assert g not in made and g >= first + stored, f"step {g} requested twice"
            made[g] = step
        assert step in made or step < first + stored, f"step {step} trains on rollouts nobody requested"
    return made


def test_synchronous_schedule_generates_every_step_with_its_own_weights():
    s = RolloutSchedule.starting_at(0, async_steps=0, total_steps=5)
    assert _run(s, 0, 5) == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    assert list(s.in_flight(5)) == []


def test_one_step_ahead_uses_the_previous_steps_weights_and_never_runs_past_the_end():
    s = RolloutSchedule.starting_at(0, async_steps=1, total_steps=5)
    assert [list(s.requests(0))] == [[0, 1]]  # W_0 makes R_0 and R_1
    assert list(s.in_flight(1)) == [1]  # a checkpoint after step 0 must hold R_1
    assert [list(s.requests(k)) for k in (1, 2, 3)] == [[2], [3], [4]]
    assert list(s.requests(4)) == []  # the last step sends no weights: nothing left to generate
    assert list(s.in_flight(5)) == []


def test_k_steps_ahead():
    s = RolloutSchedule.starting_at(0, async_steps=2, total_steps=6)
    assert _run(s, 0, 6) == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 3}


def test_resume_with_the_checkpoints_rollouts_continues_the_uninterrupted_schedule():
    whole = _run(RolloutSchedule.starting_at(0, async_steps=1, total_steps=8), 0, 8)
    resumed = RolloutSchedule.starting_at(3, async_steps=1, total_steps=8, stored=1)  # R_3 in the checkpoint
    assert {**{g: v for g, v in whole.items() if g <= 3}, **_run(resumed, 3, 8, stored=1)} == whole


def test_resume_without_rollouts_generates_the_first_steps_with_the_checkpoints_weights():
    s = RolloutSchedule.starting_at(3, async_steps=1, total_steps=8)
    assert list(s.requests(3)) == [3, 4]


def test_a_step_without_requested_rollouts_is_an_error():
    s = RolloutSchedule(async_steps=0, total_steps=5, next_generated=0)
    with pytest.raises(RuntimeError, match="step 2 has no rollouts"):
        s.requests(2)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_async_steps_must_be_a_non_negative_integer_named_by_its_key(bad):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"stage": "rlvr", "groups": {"inference": {"gpus": 1}}, "rlvr": {"async_steps": bad}})
    assert "rlvr.async_steps" in str(err.value)


def test_async_steps_defaults_to_synchronous():
    cfg = config_from_dict({"stage": "rlvr", "groups": {"inference": {"gpus": 1}}})
    assert cfg.rlvr.async_steps == 0
