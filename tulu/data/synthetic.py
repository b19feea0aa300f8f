"""Synthetic arithmetic data for tests and tiny runs, deterministic by seed, written as jsonl.

Kinds:
  ``sft``         ``{"messages": [user "What is 23+58?", assistant "23+58=81. The answer is 81."]}``
  ``preference``  ``{"prompt", "chosen": [user, assistant correct], "rejected": [user, wrong sum or a refusal]}``
  ``rlvr``        Ai2's RLVR schema: ``{"messages": [user], "ground_truth": "81", "dataset": "gsm8k"}``

    python -m tulu.data.synthetic sft 1000 --seed 0 --out data/sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from tulu.atomic import open_atomic


KINDS = ("sft", "preference", "rlvr")
REFUSALS = ("I cannot say.", "I do not know.", "That is hard to tell.", "Numbers are not my thing.")


def _problem(rng: random.Random, max_operand: int) -> tuple[str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"{a}+{b}", a + b


def _question(expr: str) -> str:
    return f"What is {expr}?"


def _answer(expr: str, value: int) -> str:
    return f"{expr}={value}. The answer is {value}."


def synthetic_rows(kind: str, n: int, seed: int, max_operand: int = 99) -> list[dict[str, Any]]:
    """``n`` rows of one kind; the same (kind, n, seed) always gives the same rows."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {', '.join(KINDS)}")
    rng = random.Random(f"{kind}:{seed}")
    rows = []
    for _ in range(n):
        expr, value = _problem(rng, max_operand)
        user = {"role": "user", "content": _question(expr)}
        if kind == "sft":
            rows.append({"messages": [user, {"role": "assistant", "content": _answer(expr, value)}]})
        elif kind == "preference":
            # Half the rejected answers get the sum wrong, half dodge the question: a tiny model
            # learns the second kind from preferences alone in a few dozen steps, the first
            # only once it can add (pairs that differ in the sum alone did not move in 40 steps).
            if rng.random() < 0.5:
                wrong = value + rng.choice([-1, 1]) * rng.randint(1, 10)
                rejected = _answer(expr, wrong)
            else:
                rejected = rng.choice(REFUSALS)
            rows.append({
                "prompt": user["content"],
                "chosen": [user, {"role": "assistant", "content": _answer(expr, value)}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
            })
        else:
            rows.append({"messages": [user], "ground_truth": str(value), "dataset": "gsm8k"})
    return rows


def write_jsonl(rows: list[dict[str, Any]], out_path: str | Path) -> Path:
    """Write rows as jsonl atomically (``tulu.atomic``)."""
    out = Path(out_path)
    with open_atomic(out) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def make_synthetic(kind: str, n: int, seed: int, out_path: str | Path, max_operand: int = 99) -> Path:
    """Write ``n`` synthetic rows of ``kind`` ("sft", "preference", "rlvr") to ``out_path``."""
    return write_jsonl(synthetic_rows(kind, n, seed, max_operand), out_path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic arithmetic data as jsonl.")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--max-operand", type=int, default=99)
    a = p.parse_args(argv)
    print(make_synthetic(a.kind, a.n, a.seed, a.out, a.max_operand))


if __name__ == "__main__":
    main()
