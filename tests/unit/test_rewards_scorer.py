"""The scorer's promises: rewards as configured, hard time-outs, a pool that survives anything a
verifier or a row can do, and the ``tulu score`` command.

Worker processes take a few seconds to start on a busy 2-core machine, so most tests share one
scorer; ``tests/unit/data/rewards_test_plugin.py`` adds verifiers that hang, crash or hog memory.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tulu.rewards import RewardConfig, RewardScorer
from tulu.rewards.hendrycks_math import MATH_RULE
from tulu.rewards.score_cli import main as score_main

DATA = Path(__file__).parent / "data"
PLUGIN = "rewards_test_plugin"
MB = 1 << 20
LANG_EN = json.dumps({"func_name": "validate_response_language", "language": "en"})
SENTENCES = json.dumps({"func_name": "verify_sentence_constraint", "N": 3, "quantifier": "at least"})
GOOD_ROW = {"dataset": "MATH", "completion": "so \\boxed{\\frac{1}{2}}", "ground_truth": "0.5"}


@pytest.fixture(scope="module")
def scorer():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(DATA))  # workers inherit sys.path, also the replacements
        with RewardScorer(RewardConfig(), workers=2, timeout_s=20.0, plugins=[PLUGIN]) as s:
            yield s


def _still_usable(scorer):
    [res] = scorer.score([GOOD_ROW])
    assert (res.verified, res.reward, res.error) == (True, 10.0, None)


def test_scorer_rewards_follow_config_and_eos_penalty():
    rows = [
        {"dataset": "gsm8k", "completion": "so 72", "ground_truth": "72"},
        {"dataset": "gsm8k", "completion": "so 71", "ground_truth": "72"},
        {"dataset": "gsm8k", "completion": "so 72", "ground_truth": "72", "ended_with_eos": False},
        {"dataset": "ifeval", "completion": "ALL CAPS", "ground_truth": '{"func_name": "validate_uppercase"}'},
    ]
    cfg = RewardConfig(verified_reward=1.0, unverified_reward=-0.5, no_eos_penalty=2.0)
    with RewardScorer(cfg, workers=1, timeout_s=20.0) as s:
        results = s.score(rows)
        assert [r.reward for r in results] == [1.0, -0.5, -1.0, 1.0]
        assert [r.verified for r in results] == [True, False, True, True]
        assert [r.verifier for r in results] == ["gsm8k", "gsm8k", "gsm8k", "ifeval"]
        assert s.stats.rows == 4 and s.stats.verified == 3
        assert s.stats.per_verifier["gsm8k"].accuracy == pytest.approx(2 / 3)


ADVERSARIAL = [
    # (id, dataset, completion, ground_truth, expected verified)
    ("boxed-exponent-tower", "MATH", "\\boxed{10^{10^{10^{10}}}}", "5", False),
    ("python-power-tower", "MATH", "$9**9**9**9$", "5", False),
    ("python-power-tower-gsm8k-last-number", "gsm8k", "9**9**9**9", "9", True),
    ("huge-exponent", "MATH", "\\boxed{2^{999999999}}", "5", False),
    ("huge-factorial", "MATH", "\\boxed{99999!}", "5", False),
    ("e-tower", "MATH", "\\boxed{e^{e^{e^{e^{e^{10}}}}}}", "5", False),
    ("frac-x5000-unclosed", "MATH", "$\\boxed{" + "\\frac{" * 5000 + "$", "5", False),
    ("frac-x5000-closed", "MATH", "\\boxed{" + "\\frac{" * 5000 + "1}{2}" * 5000 + "}", "5", False),
    ("sqrt-nested-60", "MATH", "\\boxed{" + "\\sqrt{" * 60 + "2" + "}" * 61, "5", False),
    ("1mb-then-boxed", "MATH", "a" * MB + "\\boxed{42}", "42", True),
    ("1mb-of-boxed", "MATH", "\\boxed{" * (MB // 7), "42", False),
    ("1mb-of-dollars", "MATH", "$" * MB, "42", False),
    ("1mb-of-final-answers", "MATH", "Final Answer: The final answer is " * (MB // 33), "5", False),
    ("1mb-number", "gsm8k", "9" * MB, "9", False),
    ("1mb-of-minus", "gsm8k", "-" * MB + "5", "-5", True),  # the last number reads as -5
    ("1mb-of-numbers", "gsm8k", "1 " * (MB // 2) + "42", "42", True),
    ("1mb-language", "ifeval", "This is an ordinary English sentence. " * (MB // 38), LANG_EN, True),
    ("1mb-sentences", "ifeval", "Mr. " * (MB // 4), SENTENCES, False),
    ("1mb-periods", "ifeval", "." * MB + "x", SENTENCES, False),
    ("1mb-open-brackets-json", "ifeval", "[" * MB, '{"func_name": "validate_json_format"}', False),
    ("1mb-open-brackets-placeholders", "ifeval", "[" * MB, '{"func_name": "validate_placeholders", "N": 2}', False),
    ("1mb-angles-title", "ifeval", "<<" * (MB // 2), '{"func_name": "validate_title"}', False),
    ("1mb-spaces-json", "ifeval", "```" + " " * MB + "x", '{"func_name": "validate_json_format"}', False),
    ("1mb-asterisks", "ifeval", "*" * MB, '{"func_name": "validate_highlighted_sections", "N": 2}', False),
    ("fullwidth-digits-gsm8k", "gsm8k", "The answer is \uff17\uff12", "72", False),
    ("fullwidth-digits-math", "MATH", "\\boxed{\uff17\uff12}", "72", False),
    ("zero-width-joiner-in-number", "gsm8k", "The answer is 7\u200d2", "72", False),
    ("rtl-mark-after-number", "gsm8k", "The answer is 72\u200f", "72", True),
    ("rtl-override-in-boxed", "MATH", "\\boxed{\u202e27}", "72", False),
    ("homoglyph-cyrillic-a-keyword", "ifeval", "I love \u0430pples",
     '{"func_name": "verify_keywords", "keyword_list": ["apples"]}', False),
    ("homoglyph-cyrillic-capital-lowercase", "ifeval", "\u041dello", '{"func_name": "validate_lowercase"}', False),
    ("zero-width-only-language", "ifeval", "\u200d\u200f" * (MB // 2), LANG_EN, False),
]


def test_adversarial_inputs_finish_under_timeout_with_sane_answers_and_pool_stays_usable(scorer):
    before = scorer.stats.timeouts, scorer.stats.errors, scorer.stats.workers_replaced
    start = time.monotonic()
    results = scorer.score({"dataset": d, "completion": c, "ground_truth": g} for _, d, c, g, _ in ADVERSARIAL)
    elapsed = time.monotonic() - start
    got = {case[0]: (res.verified, res.error) for case, res in zip(ADVERSARIAL, results)}
    want = {case[0]: (case[4], None) for case in ADVERSARIAL}
    assert got == want
    assert (scorer.stats.timeouts, scorer.stats.errors, scorer.stats.workers_replaced) == before
    assert elapsed < 120, f"adversarial batch took {elapsed:.0f} s"
    _still_usable(scorer)


def test_stuck_worker_is_killed_and_replaced_and_scoring_continues(scorer, monkeypatch):
    monkeypatch.setattr(scorer, "timeout_s", 1.0)
    pids = set(scorer.worker_pids)
    before = scorer.stats.timeouts, scorer.stats.workers_replaced
    start = time.monotonic()
    stuck = {"dataset": "test-sleep", "completion": "", "ground_truth": "3600"}
    results = scorer.score([stuck, GOOD_ROW, stuck, GOOD_ROW])
    assert time.monotonic() - start < 60
    assert [(r.verified, r.error) for r in results] == [(False, "timeout"), (True, None)] * 2
    assert [r.reward for r in results] == [0.0, 10.0, 0.0, 10.0]
    assert scorer.stats.timeouts == before[0] + 2
    assert scorer.stats.workers_replaced == before[1] + 2
    assert set(scorer.worker_pids) != pids
    for pid in pids - set(scorer.worker_pids):  # the stuck ones are gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    _still_usable(scorer)


def test_rows_queued_behind_a_stuck_row_are_scored_by_the_other_workers(scorer, monkeypatch):
    """Each worker has several rows queued (IN_FLIGHT); the ones behind a row that times out were
    never started: they are scored elsewhere, not counted as time-outs."""
    monkeypatch.setattr(scorer, "timeout_s", 1.0)
    before = scorer.stats.timeouts
    stuck = {"dataset": "test-sleep", "completion": "", "ground_truth": "3600"}
    results = scorer.score([stuck] + [GOOD_ROW] * 9)
    assert [(r.verified, r.error) for r in results] == [(False, "timeout")] + [(True, None)] * 9
    assert scorer.stats.timeouts == before + 1
    _still_usable(scorer)


def test_crashing_worker_scores_zero_is_counted_and_replaced(scorer):
    before = scorer.stats.errors, scorer.stats.workers_replaced
    [crash, good] = scorer.score([{"dataset": "test-crash", "completion": "", "ground_truth": ""}, GOOD_ROW])
    assert (crash.verified, crash.reward) == (False, 0.0)
    assert crash.error == "worker died (exit code 3)"
    assert good.verified
    assert (scorer.stats.errors, scorer.stats.workers_replaced) == (before[0] + 1, before[1] + 1)


def test_worker_killed_while_idle_is_replaced_on_next_score(scorer):
    for pid in scorer.worker_pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    results = scorer.score([GOOD_ROW] * 4)
    assert all(r.verified and r.error is None for r in results)


def test_verifier_error_scores_zero_and_is_counted_not_raised(scorer):
    before = scorer.stats.errors
    [res] = scorer.score([{"dataset": "ifeval", "completion": "x", "ground_truth": '{"func_name": "nope"}'}])
    assert (res.verified, res.reward) == (False, 0.0)
    assert res.error.startswith("ConstraintError: unknown IFEval func_name 'nope'")
    assert scorer.stats.errors == before + 1


def test_bad_rows_score_zero_with_a_reason_and_are_counted(scorer):
    before = scorer.stats.bad_rows
    rows = [
        {"dataset": "gsm8k", "ground_truth": "1"},
        {"dataset": "code", "completion": "x", "ground_truth": "1"},
        {"dataset": "gsm8k", "completion": 42, "ground_truth": "42"},
        None,
    ]
    results = scorer.score(rows)
    assert all(not r.verified and r.reward == 0.0 for r in results)
    assert "missing column(s) ['completion']" in results[0].error
    assert "unknown verifier 'code'; known verifiers: gsm8k, ifeval, math" in results[1].error
    assert "'completion' must be a string" in results[2].error
    assert "row must be a mapping" in results[3].error
    assert scorer.stats.bad_rows == before + 4


def test_memory_hog_hits_the_worker_memory_limit_and_scores_zero():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(DATA))
        with RewardScorer(workers=1, timeout_s=60.0, memory_limit_mb=1500, plugins=[PLUGIN]) as s:
            [hog, good] = s.score([{"dataset": "test-hog", "completion": "", "ground_truth": ""}, GOOD_ROW])
            assert (hog.verified, hog.reward) == (False, 0.0)
            assert hog.error.startswith("MemoryError") or hog.error.startswith("worker died")
            assert good.verified


def test_closing_the_scorer_stops_its_workers():
    with RewardScorer(workers=1, timeout_s=20.0) as s:
        pids = s.worker_pids
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        s.score([GOOD_ROW])


def test_score_cli_writes_rewards_per_line_and_reports_bad_rows_by_line_number(tmp_path, capsys):
    src = tmp_path / "in put's.jsonl"  # a path with a space and a quote
    rows = [
        {"id": 1, "dataset": "gsm8k", "completion": "It is 72.", "ground_truth": "72"},
        {"id": 2, "dataset": "MATH", "completion": "\\boxed{3}", "ground_truth": "4"},
        {"id": 3, "dataset": "ifeval", "completion": "hi", "ground_truth": '{"func_name": "validate_lowercase"}'},
        {"id": 4, "dataset": "gsm8k", "ground_truth": "1"},
        {"id": 5, "dataset": "poetry", "completion": "x", "ground_truth": "y"},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "scored" / "out.jsonl"

    rc = score_main([str(src), "--out", str(out), "--workers", "1", "--timeout", "20", "--verified-reward", "1"])

    assert rc == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(written) == 6
    assert [(w.get("id"), w["reward"], w["verified"]) for w in written] == [
        (1, 1.0, True), (2, 0.0, False), (3, 1.0, True), (None, 0.0, False), (4, 0.0, False), (5, 0.0, False),
    ]
    assert written[0]["completion"] == "It is 72."  # the row is written back whole
    assert "score_error" not in written[0]
    cap = capsys.readouterr()
    assert f"{src}:4: bad row: not JSON" in cap.err
    assert f"{src}:5: bad row: missing column(s) ['completion']" in cap.err
    assert f"{src}:6: bad row: unknown verifier 'poetry'; known verifiers: gsm8k, ifeval, math" in cap.err
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["rows"] == 6 and summary["verified"] == 2 and summary["bad_rows"] == 3
    assert summary["per_verifier"]["gsm8k"] == {"rows": 2, "verified": 1, "accuracy": 0.5}
    assert (summary["errors"], summary["timeouts"]) == (0, 0)
    assert "verifier" in cap.out and "accuracy" in cap.out  # the table
    assert MATH_RULE in cap.out  # a MATH row was scored: the rule it was scored by is stated


def test_score_cli_missing_input_is_a_usage_error(tmp_path, capsys):
    assert score_main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "input file not found" in capsys.readouterr().err


def test_workers_warm_up_only_the_named_verifiers_and_still_score_the_others():
    import subprocess

    probe = ("import sys; from tulu.rewards.worker import warm_up; warm_up({names}); "
             "print(sorted(m for m in ('sympy', 'math_verify', 'langdetect') if m in sys.modules))")
    only = subprocess.run([sys.executable, "-c", probe.format(names="('gsm8k',)")], capture_output=True, text=True,
                          check=True).stdout.strip()
    every = subprocess.run([sys.executable, "-c", probe.format(names="None")], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert only == "[]" and every == "['langdetect', 'math_verify', 'sympy']"
    # a row's dataset names its verifier in any case ("MATH" in Ai2's data): warmed all the same
    upper = subprocess.run([sys.executable, "-c", probe.format(names="('MATH',)")], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert upper == "['math_verify', 'sympy']"
    with RewardScorer(workers=1, timeout_s=30.0, verifiers=("gsm8k",)) as gsm8k_only:
        results = gsm8k_only.score([{"completion": "so 12", "dataset": "gsm8k", "ground_truth": "12"},
                                    {"completion": "\\boxed{\\frac{1}{2}}", "dataset": "math", "ground_truth": "0.5"}])
    assert [r.verified for r in results] == [True, True]  # math imports on first use (time-out permitting)
