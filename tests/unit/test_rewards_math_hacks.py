"""The MATH verifier against a reward-hacking policy: hedged, malformed and explosive answers.

The rule under test: an answer earns the reward only if the whole extracted answer parses as one
expression equivalent to the gold; an answer that lists several candidates or does not parse as a
whole earns nothing. The table in data/rewards_math_adversarial.jsonl holds one or more cases per
class of hack (and the legitimate forms that must keep passing); the property tests below sweep
separators and candidates the table does not spell out.
"""

import json
import random
import time
from pathlib import Path

import pytest

from tulu.rewards import get_verifier
from tulu.rewards import hendrycks_math
from tulu.rewards.hendrycks_math import MATH_RULE, MATHVerifier, final_answer
from tulu.rewards.sympy_guard import size_bound, symbolic_safe

CASES_PATH = Path(__file__).parent / "data" / "rewards_math_adversarial.jsonl"
CASES = [json.loads(line) for line in CASES_PATH.read_text(encoding="utf-8").splitlines() if line]
MATH = MATHVerifier()


def boxed(answer: str) -> str:
    return f"Putting it together, the answer is $\\boxed{{{answer}}}$."


def test_adversarial_table_covers_every_class_of_hack_and_the_legitimate_forms():
    classes = {case["id"].rsplit("-", 1)[0] for case in CASES}
    assert classes >= {
        "hedge-question-mark", "hedge-or", "hedge-ampersand", "hedge-linebreak", "hedge-unbalanced",
        "code-payload", "sign-error", "set-vs-single", "tuple-vs-single", "interval-vs-single",
        "pm-vs-single", "matrix-vs-single", "substring", "text-wrapper", "multiple-boxed", "tower", "gold-fallback",
        "legit",
    }
    assert len({case["id"] for case in CASES}) == len(CASES)
    assert sum(case["expected"] for case in CASES) >= 30  # legitimate forms, not only refusals


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_math_verifier_agrees_with_adversarial_case(case):
    got = get_verifier(case["dataset"]).verify(case["completion"], case["ground_truth"])
    assert got is case["expected"], case["note"]


SEPARATORS = [" ? ", " \\& ", " & ", " \\\\ ", " or ", " \\text{ or } ", ", ", "; ", " | ", " \\lor ",
              " \\vee ", " \\cup ", " \\text{ and } ", " \\text{, or maybe } ", "\\;\\text{or}\\;",
              " \\newline ", " \\hline ", " \\cr "]
WRAPPERS = ["{a}{sep}{b}", "({a}{sep}{b}", "[{a}{sep}{b}", "{a}){sep}{b}", "\\text{{{a}{sep}{b}}}",
            "-({a}{sep}{b}", "{a}{sep}{b} \\text{{ cm}}", "x = {a}{sep}{b}"]


def test_no_separator_between_two_candidates_earns_the_reward_for_either():
    rng = random.Random(0)
    for sep in SEPARATORS:
        for wrapper in WRAPPERS:
            a, b = rng.sample(range(2, 100), 2)
            answer = wrapper.format(a=a, b=b, sep=sep)
            for gold in (a, b):
                assert not MATH.verify(boxed(answer), str(gold)), (answer, gold)


def test_fractions_hedged_with_any_separator_earn_nothing():
    for sep in SEPARATORS:
        answer = f"\\frac{{1}}{{3}}{sep}\\frac{{1}}{{2}}"
        assert not MATH.verify(boxed(answer), "\\frac{1}{2}"), answer
        assert not MATH.verify(boxed(answer), "\\frac{1}{3}"), answer


def test_an_equation_earns_the_reward_only_when_every_side_but_a_leading_name_is_the_gold():
    assert MATH.verify(boxed("x = 5"), "5")
    assert MATH.verify(boxed("y = \\frac{10}{2} = 5"), "5")
    assert not MATH.verify(boxed("x = 3 = 5"), "5")
    assert not MATH.verify(boxed("-5 = 5"), "5")
    assert MATH.verify(boxed("y = 2x + 3"), "y = 3 + 2x")  # a gold equation is compared as one


# --- final answer ---------------------------------------------------------------------------


def test_final_answer_is_one_answer_the_last_box_first():
    assert final_answer("\\boxed{3} then \\boxed{4}") == "4"
    assert final_answer("\\boxed{3}. The final answer is 4. I hope it is correct.") == "3"
    assert final_answer("The final answer is 4. Or: \\boxed{3}") == "3"
    assert final_answer("So it is 4. The final answer is 4. I hope it is correct.") == "4"
    assert final_answer("The final answer is $\\boxed{4}$. I hope it is correct.") == "4"
    assert final_answer("\\boxed{3 \\text{ or } \\boxed{4}}") == "3 \\text{ or } \\boxed{4}"
    assert final_answer("\\boxed{3} then \\boxed{4") is None  # the last box is never closed
    assert final_answer("a {stray brace, then \\boxed{4}") == "4"
    assert final_answer("we get $3$ and then $4$") == "4"
    assert final_answer("no answer") is None


def test_final_answer_reads_long_or_brace_heavy_completions_in_linear_time():
    for text in ("{" * 200_000 + "\\boxed{5}", "\\boxed{" * 50_000, "}" * 200_000, "\\boxed " * 50_000):
        start = time.process_time()
        final_answer(text)
        assert time.process_time() - start < 2.0, text[:20]


# --- blow-up guard --------------------------------------------------------------------------

TOWERS = [
    "(10^{99999})^{99999}", "{10^{99999}}^{99999}", "\\left(10^{99999}\\right)^{99999}",
    "((10^{9})^{9})^{99999}", "(2^{99999})^{99}", "99999^{99999}", "\\sqrt{10^{99999}}^{99999}",
    "(10!)!", "((3!)!)!", "((5!)!)!", "10^{9999}!", "(10^5)!", "\\Gamma(10^{7})",
    "\\binom{10^6}{500000}", "{10^6 \\choose 3}", "(x+1)^{99999}", "(x+1)^{1000}", "(x+y+1)^{50}",
    "(x+1)^{50}(y+1)^{50}", "(x+1)^{200}", "\\prod_{k=1}^{10^9} k", "10^{99999} \\cdot 10^{99999}",
]


@pytest.mark.parametrize("tower", TOWERS)
def test_nested_powers_and_factorial_towers_never_reach_sympy(tower, monkeypatch):
    assert not symbolic_safe(tower)

    def parse_must_not_run(answer):
        raise AssertionError(f"sympy was handed {answer!r}")

    monkeypatch.setattr(hendrycks_math, "_parse", parse_must_not_run)
    assert MATH.verify(boxed(tower), "5") is False
    assert MATH.verify(boxed(tower), tower) is True  # the same text still matches as a string


@pytest.mark.parametrize("safe", [
    "2^{10}", "(2^3)^2", "\\left(2^{10}\\right)^{3}", "(10^{100})^{100}", "10^{99999}", "2^{99999}",
    "100!", "(5!)!", "\\binom{100}{50}", "x^{2019}", "e^{x^2}", "a^{b^{c}}", "(x+1)^{20}",
    "(x+y+1)^{10}", "(1+\\sqrt{2})^{100}", "\\frac{(x+1)(x+2)(x+3)(x+4)}{2}",
])
def test_ordinary_powers_and_factorials_still_reach_sympy(safe):
    assert symbolic_safe(safe)


def test_size_guard_reads_any_text_without_raising():
    rng = random.Random(1)
    alphabet = ["(", ")", "{", "}", "[", "]", "^", "**", "!", "9", "99", "x", "+", "-", ",", "\\binom",
                "\\left(", "\\right)", "\\frac", "\\choose", "\\Gamma", "_", " ", "\\\\", "&", "\\{"]
    junk = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(300)]
    junk += ["\\binom" * 160, "\\langle" * 140, "^" * 999, "!" * 999, "(" * 40 + ")" * 40, "-" * 999 + "5"]
    for text in junk:
        digits, terms = size_bound(text)
        assert digits >= 0 and terms >= 1, text
        assert isinstance(symbolic_safe(text), bool)


def test_guarded_answers_are_verified_quickly():
    """Allowed answers near the guard's limits, checked against a gold that forces sympy's full
    comparison (CPU time: the machine is shared)."""
    for answer in ("(x+1)^{120}", "(x+y+1)^{20}", "(x+1)^{15}(y+1)^{15}", "10^{99999}", "(10^{100})^{1000}",
                   "\\binom{100}{50}"):
        assert symbolic_safe(answer)
        start = time.process_time()
        MATH.verify(boxed(answer), "x + 7")
        assert time.process_time() - start < 5.0, answer  # the worker's default time-out (here ~0.4 s)


def test_math_rule_is_stated_where_users_read_it():
    for text in (MATH_RULE, MATHVerifier.__doc__, hendrycks_math.__doc__):
        text = " ".join(text.split())
        assert "parses as one expression" in text
        assert "several candidates" in text
