"""Paired held-out differences between stages, over several runs: the figure issue 18's
acceptance reads (a gain of more than two standard errors)."""

import json
import math

import pytest

from tulu.pipeline.paired import compare, main, paired_difference


def _write(run, stage, verdicts):
    d = run / "eval"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"samples-{stage}.jsonl", "w") as f:
        for (task, prompt), ok in verdicts.items():
            f.write(json.dumps({"task": task, "prompt": prompt, "verified": ok, "completion": "", "ground_truth": ""}) + "\n")


def test_standard_error_of_the_paired_difference():
    r = paired_difference([1, 0, 0, -1, 1, 0])
    assert r["n"] == 6 and r["gain"] == pytest.approx(1 / 6)
    sd = math.sqrt(sum((d - 1 / 6) ** 2 for d in [1, 0, 0, -1, 1, 0]) / 5)
    assert r["se"] == pytest.approx(sd / math.sqrt(6)) and r["z"] == pytest.approx((1 / 6) / r["se"])


def test_items_pair_within_a_run_and_pool_across_runs(tmp_path):
    a, b = tmp_path / "s1", tmp_path / "s2"
    _write(a, "sft", {("math", "p1"): False, ("math", "p2"): True, ("ifeval", "q"): False})
    _write(a, "dpo", {("ifeval", "q"): True, ("math", "p2"): True, ("math", "p1"): True})  # order differs
    _write(b, "sft", {("math", "p1"): True, ("math", "p2"): True, ("ifeval", "q"): True})
    _write(b, "dpo", {("math", "p1"): False, ("math", "p2"): True, ("ifeval", "q"): True})
    rows = {(r["to"], r["task"]): r for r in compare([a, b])}
    assert rows["dpo", "all"]["n"] == 6 and rows["dpo", "all"]["gain"] == pytest.approx((1 + 1 - 1) / 6)
    assert rows["dpo", "math"]["gain"] == pytest.approx(0.0) and rows["dpo", "ifeval"]["gain"] == pytest.approx(0.5)


def test_different_prompts_or_a_missing_stage_are_refused(tmp_path, capsys):
    _write(tmp_path / "r", "sft", {("math", "p1"): True})
    _write(tmp_path / "r", "dpo", {("math", "p9"): True})
    with pytest.raises(ValueError, match="different prompts"):
        compare([tmp_path / "r"])
    with pytest.raises(FileNotFoundError, match="rlvr"):
        compare([tmp_path / "r"], stages=["sft", "rlvr"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
    assert "need two evaluated stages" in capsys.readouterr().err
