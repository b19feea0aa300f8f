"""GSM8K-style word problems: one addition, subtraction or single-digit multiplication in a story.

    "Ann has 23 apples and buys 18 more. How many apples does Ann have now?"
    -> "23+18=41. The answer is 41."        (ground truth "41", verifier "gsm8k": last number)

The operation is only in the words ("buys more", "gives away", "bags of"), so a model must read
the story, not just the numbers. The problem key is the operation and its operands (sorted where
order does not matter), so held-out stories ask sums the model never trained on.
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


def draw(rng: random.Random, max_operand: int = MAX_OPERAND) -> Problem:
    if not MIN_MAX_OPERAND <= max_operand <= MAX_MAX_OPERAND:
        raise ValueError(f"gsm8k max_operand must be {MIN_MAX_OPERAND}..{MAX_MAX_OPERAND}, got {max_operand}")
    op = rng.choice(tuple(TEMPLATES))
    a, b, value = _operands(op, rng, max_operand)
    name, other = rng.sample(NAMES, 2)
    prompt = rng.choice(TEMPLATES[op]).format(n=name, m=other, o=rng.choice(OBJECTS), a=a, b=b)
    key = f"{op} {a} {b}" if op == "-" else f"{op} {min(a, b)} {max(a, b)}"
    return Problem(key, prompt, f"{a}{op}{b}={value}. The answer is {value}.", str(value))
