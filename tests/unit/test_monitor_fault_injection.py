"""TULU_FAULT parsing and gating: faults fire where, when and on the attempt they say."""

from __future__ import annotations

import pytest

from monitoring.faults import InjectedFault, maybe_inject, parse_faults


def test_fault_fires_only_at_its_rank_step_point_and_first_attempt():
    specs = parse_faults("kind=exception,rank=3,step=2,point=train")
    maybe_inject("train", 2, 2, 0, specs)          # other rank
    maybe_inject("train", 1, 3, 0, specs)          # other step
    maybe_inject("generate", 2, 3, 0, specs)       # other point
    maybe_inject("train", 2, 3, 1, specs)          # requeued attempt: runs clean
    with pytest.raises(InjectedFault, match="rank 3"):
        maybe_inject("train", 2, 3, 0, specs)


def test_restart_any_fires_on_every_attempt():
    (spec,) = parse_faults("kind=exception,rank=0,step=1,restart=any,point=p")
    assert spec.matches("p", 1, 0, 0) and spec.matches("p", 1, 0, 4)


def test_straggler_applies_from_its_step_on(monkeypatch):
    (spec,) = parse_faults("kind=straggler,rank=1,step=2,seconds=0.25")
    assert not spec.matches("x", 1, 1, 0) and spec.matches("x", 5, 1, 0)
    assert spec.seconds == 0.25


def test_hang_kinds_default_to_their_phase():
    specs = parse_faults("kind=hang_checkpoint,rank=0,step=2;kind=hang_weight_sync,step=1")
    assert [s.point for s in specs] == ["checkpoint", "weight_sync"]
    assert specs[1].rank is None


@pytest.mark.parametrize("text,msg", [("kind=meltdown", "valid kinds"),
                                      ("kind=sigstop,rnak=1", "unknown field"),
                                      ("kind=sigstop,rank", "key=value"),
                                      ("kind=sigstop,restart=first", "restart")])
def test_bad_fault_spec_says_what_is_wrong(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_faults(text)


def test_no_env_means_no_fault(monkeypatch):
    monkeypatch.delenv("TULU_FAULT", raising=False)
    maybe_inject("train", 0, 0)
