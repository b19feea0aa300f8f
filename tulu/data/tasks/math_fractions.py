"""MATH-style fraction arithmetic whose answers need an equivalence check, boxed.

    "What is 2/9 + 4/9? Put the answer in \\boxed{}."
    -> "2/9+4/9=6/9. \\boxed{\\frac{6}{9}}"  or  "2/9+4/9=6/9=2/3. \\boxed{\\frac{2}{3}}"
    ground truth "\\frac{2}{3}" (always simplified; a whole number when the fraction is one)

Half the SFT targets that could be simplified box the unsimplified fraction, so the data itself
exercises the MATH verifier's equivalence test, and both forms earn the reward. Denominators stay
at 12 or below (``max_denominator``; the embedded default asks 6) so a tiny model can learn the
numerator arithmetic. The problem key is the
arithmetic without its wording (addends sorted).
"""

from __future__ import annotations

import random
from fractions import Fraction

from tulu.data.tasks.problem import Problem

VERIFIER = "MATH"
MAX_DENOMINATOR = 12
"""The default largest denominator (`pipeline.tasks.math_max_denominator`)."""
MIN_MAX_DENOMINATOR, MAX_MAX_DENOMINATOR = 3, 20
WORDINGS = ("What is {e}? Put the answer in \\boxed{{}}.",
            "Compute {e}. Put the answer in \\boxed{{}}.",
            "Find {e}. Write the answer in \\boxed{{}}.")


def latex(value: Fraction) -> str:
    """``\\frac{p}{q}``, or the whole number when the denominator is 1."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _expression(rng: random.Random, max_denominator: int) -> tuple[str, str, str, int, int]:
    """(key, prompt expression, worked expression, numerator, denominator) of one problem."""
    op = rng.choice("+-*")
    d = rng.randint(3 if op == "-" else 2, max_denominator)   # a proper a/d above b/d needs d >= 3
    if op == "+":
        a, b = rng.randint(1, d - 1), rng.randint(1, d - 1)
        return f"+ {min(a, b)} {max(a, b)} {d}", f"{a}/{d} + {b}/{d}", f"{a}/{d}+{b}/{d}", a + b, d
    if op == "-":
        a = rng.randint(2, d - 1)
        b = rng.randint(1, a - 1)
        return f"- {a} {b} {d}", f"{a}/{d} - {b}/{d}", f"{a}/{d}-{b}/{d}", a - b, d
    k, a = rng.randint(2, 5), rng.randint(1, d - 1)
    return f"* {k} {a} {d}", f"{k} times {a}/{d}", f"{k}*{a}/{d}", k * a, d


def draw(rng: random.Random, max_denominator: int = MAX_DENOMINATOR) -> Problem:
    if not MIN_MAX_DENOMINATOR <= max_denominator <= MAX_MAX_DENOMINATOR:
        raise ValueError(f"math max_denominator must be {MIN_MAX_DENOMINATOR}..{MAX_MAX_DENOMINATOR}, "
                         f"got {max_denominator}")
    key, shown, worked, num, den = _expression(rng, max_denominator)
    prompt = rng.choice(WORDINGS).format(e=shown)
    value = Fraction(num, den)
    raw = f"{num}/{den}"
    if value.denominator == den:                     # already in lowest terms
        answer = f"{worked}={raw}. \\boxed{{{latex(value)}}}"
    elif rng.random() < 0.5:                         # unsimplified: the verifier must see 6/9 = 2/3
        answer = f"{worked}={raw}. \\boxed{{\\frac{{{num}}}{{{den}}}}}"
    else:
        simple = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        answer = f"{worked}={raw}={simple}. \\boxed{{{latex(value)}}}"
    # the slip boxes the numerator alone: never the value, as every denominator is at least 2
    slip = f"{worked}={raw}. \\boxed{{{num}}}"
    return Problem(key, prompt, answer, latex(value), slip)
