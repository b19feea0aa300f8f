"""GSM8K-style word problems: one or two additions, subtractions or single-digit multiplications
in a story.

    "Ann has 23 apples and buys 18 more. How many apples does Ann have now?"
    -> "23+18=41. The answer is 41."        (ground truth "41", verifier "gsm8k": last number)
    steps=2: "Ann has 7 pens, buys 5 more and gives away 4. How many pens are left?"
    -> "7+5=12. 12-4=8. The answer is 8."

The operation is only in the words ("buys more", "gives away", "bags of"), so a model must read
the story, not just the numbers. The problem key is the operations and their operands (sorted
where order does not matter). With one step a held-out story asks an arithmetic fact the model
never trained on, which a ~1M-parameter model cannot infer; with two steps (``steps=2``) a
held-out story chains two facts in a way the model has not seen, while each fact on its own also
occurs in training stories - the multi-step reasoning GSM8K asks, at a size a tiny model can learn.
"""

from __future__ import annotations

import random

from tulu.data.tasks.problem import Problem

VERIFIER = "gsm8k"
NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana",
         "Ivy", "Jon", "Kai", "Lea", "Max", "Nia", "Omar", "Pia")
OBJECTS = ("apples", "pens", "cards", "eggs", "shells", "books", "coins", "beads",
           "stamps", "cups", "toys", "plums")
TEMPLATES = {
    "+": ("{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
          "{n} has {a} {o}. {m} gives {n} {b} more. How many {o} does {n} have?"),
    "-": ("{n} has {a} {o} and gives away {b}. How many {o} are left?",
          "{n} had {a} {o} and lost {b}. How many {o} does {n} have now?"),
    "*": ("{n} buys {a} bags of {b} {o}. How many {o} is that?",
          "{n} has {a} boxes with {b} {o} each. How many {o} in all?"),
}


MAX_OPERAND = 20
"""The default largest addend (`pipeline.tasks.gsm8k_max_operand`)."""
MIN_MAX_OPERAND, MAX_MAX_OPERAND = 4, 99


def _operands(op: str, rng: random.Random, max_operand: int) -> tuple[int, int, int]:
    # Small numbers: a ~1M-parameter model must first learn to copy them out of the story, and
    # with 2-digit operands up to 99 it still scored ~1% after ~1M training tokens.
    # max_operand M: addends 2..M, minuends 5..1.5M, products (2..5) x (2..min(10, M/2)).
    if op == "+":
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
        return a, b, a + b
    if op == "-":
        a = rng.randint(5, max_operand * 3 // 2)
        b = rng.randint(1, a - 1)
        return a, b, a - b
    a, b = rng.randint(2, 5), rng.randint(2, min(10, max_operand // 2))
    return a, b, a * b


TWO_STEP_TEMPLATES = {
    ("+", "+"): "{n} has {a} {o}, buys {b} more and gets {c} from {m}. How many {o} now?",
    ("+", "-"): "{n} has {a} {o}, buys {b} more and gives away {c}. How many {o} are left?",
    ("-", "+"): "{n} has {a} {o}, loses {b} and buys {c} more. How many {o} now?",
    ("-", "-"): "{n} has {a} {o}, loses {b} and gives away {c}. How many {o} are left?",
    ("*", "+"): "{n} buys {a} bags of {b} {o} and {c} more. How many {o} in all?",
    ("*", "-"): "{n} buys {a} bags of {b} {o} and gives away {c}. How many {o} are left?",
}
STEPS = (1, 2)
"""`steps`: one operation per story (the default) or two chained (`pipeline.tasks.gsm8k_steps`)."""


def _key(op: str, a: int, b: int) -> str:
    """One operation without its wording: operands sorted where their order does not matter."""
    return f"{op} {a} {b}" if op == "-" else f"{op} {min(a, b)} {max(a, b)}"


def _two_step(rng: random.Random, max_operand: int) -> Problem:
    op = rng.choice("+-*")
    a, b, first = _operands(op, rng, max_operand)
    then = "+" if first < 2 else rng.choice("+-")  # nothing left to give away from one
    c = rng.randint(2, max_operand) if then == "+" else rng.randint(1, first - 1)
    value = first + c if then == "+" else first - c
    name, other = rng.sample(NAMES, 2)
    prompt = TWO_STEP_TEMPLATES[op, then].format(n=name, m=other, o=rng.choice(OBJECTS), a=a, b=b, c=c)
    answer = f"{a}{op}{b}={first}. {first}{then}{c}={value}. The answer is {value}."
    # the slip stops after the first step: never right, as c >= 1 changes the value
    slip = f"{a}{op}{b}={first}. The answer is {first}."
    return Problem(f"{_key(op, a, b)} {then} {c}", prompt, answer, str(value), slip)


def draw(rng: random.Random, max_operand: int = MAX_OPERAND, steps: int = 1) -> Problem:
    if not MIN_MAX_OPERAND <= max_operand <= MAX_MAX_OPERAND:
        raise ValueError(f"gsm8k max_operand must be {MIN_MAX_OPERAND}..{MAX_MAX_OPERAND}, got {max_operand}")
    if steps not in STEPS:
        raise ValueError(f"gsm8k steps must be one of {STEPS}, got {steps}")
    if steps == 2:
        return _two_step(rng, max_operand)
    op = rng.choice(tuple(TEMPLATES))
    a, b, value = _operands(op, rng, max_operand)
    name, other = rng.sample(NAMES, 2)
    prompt = rng.choice(TEMPLATES[op]).format(n=name, m=other, o=rng.choice(OBJECTS), a=a, b=b)
    # the slip answers the story's first number (never the value: b >= 1, and >= 2 for * and +)
    return Problem(_key(op, a, b), prompt, f"{a}{op}{b}={value}. The answer is {value}.", str(value),
                   f"{a}{op}{b}={value}. The answer is {a}.")
