"""Verifier throughput: completions verified per second on one core, for each verifier.

Prints one JSON line per figure:
  {"bench": "verifier_throughput", "verifier": "math", "per_core_per_s": ..., "n": ...}
and, for the process pool, {"bench": "scorer_throughput", "workers": W, "per_s": ..., "n": ...}.

Inputs are synthetic but shaped like RLVR completions (a paragraph of reasoning, then the answer),
all distinct so that math-verify's parse cache does not flatter the MATH figure; a third of MATH
answers need symbolic equivalence, a third match as strings, a third are wrong. The IFEval rows
cycle through all 25 checkers. ``--quick`` runs a tiny n so CI can keep the script from rotting.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tulu.rewards import RewardScorer, get_verifier

FILLER = (
    "First we read the problem carefully and write down what is given. Then we set up the "
    "equation, simplify both sides and check the arithmetic step by step before answering. "
)


def gsm8k_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        answer = rng.randint(1, 100_000)
        said = answer if i % 3 else answer + 1
        text = FILLER * 4 + f"So the total is {said:,} dollars.\n#### {said}"
        rows.append({"dataset": "gsm8k", "completion": text, "ground_truth": str(answer)})
    return rows


def math_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1000, 9999)
        gold = f"\\frac{{{a}}}{{{b}}}"
        said = [gold, f"\\frac{{{2 * a}}}{{{2 * b}}}", f"\\frac{{{a + 1}}}{{{b}}}"][i % 3]
        text = FILLER * 4 + f"Therefore the answer is $\\boxed{{{said}}}$."
        rows.append({"dataset": "MATH", "completion": text, "ground_truth": gold})
    return rows


IFEVAL_CONSTRAINTS = [
    {"func_name": "verify_keywords", "keyword_list": ["equation", "answer"]},
    {"func_name": "verify_keyword_frequency", "word": "the", "N": 8},
    {"func_name": "validate_forbidden_words", "forbidden_words": ["banana"]},
    {"func_name": "verify_letter_frequency", "letter": "q", "N": 2},
    {"func_name": "validate_response_language", "language": "en"},
    {"func_name": "verify_paragraph_count", "N": 2},
    {"func_name": "validate_word_constraint", "N": 100, "quantifier": "at least"},
    {"func_name": "verify_sentence_constraint", "N": 5, "quantifier": "at most"},
    {"func_name": "validate_paragraphs", "N": 2, "first_word": "first", "i": 1},
    {"func_name": "verify_postscript", "postscript_marker": "P.S."},
    {"func_name": "validate_placeholders", "N": 1},
    {"func_name": "verify_bullet_points", "N": 3},
    {"func_name": "validate_title"},
    {"func_name": "validate_choice", "options": ["My answer is yes.", "My answer is no."]},
    {"func_name": "validate_highlighted_sections", "N": 2},
    {"func_name": "validate_sections", "N": 2, "section_splitter": "Section"},
    {"func_name": "validate_json_format"},
    {"func_name": "validate_repeat_prompt", "original_prompt": "First we read"},
    {"func_name": "validate_two_responses"},
    {"func_name": "validate_uppercase"},
    {"func_name": "validate_lowercase"},
    {"func_name": "validate_frequency_capital_words", "N": 3, "quantifier": "around"},
    {"func_name": "validate_end", "end_phrase": "That is all."},
    {"func_name": "validate_quotation"},
    {"func_name": "validate_no_commas"},
]


def ifeval_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        constraint = IFEVAL_CONSTRAINTS[i % len(IFEVAL_CONSTRAINTS)]
        text = FILLER * rng.randint(2, 6) + f"\n\n* * *\n\nCase {i}. That is all."
        rows.append({"dataset": "ifeval", "completion": text, "ground_truth": json.dumps(constraint)})
    return rows


MAKERS = {"gsm8k": gsm8k_rows, "math": math_rows, "ifeval": ifeval_rows}


def bench_in_process(name: str, n: int, seed: int) -> dict:
    rows = MAKERS[name](n, random.Random(seed))
    verifier = get_verifier(name)
    warm = MAKERS[name](5, random.Random(seed + 1))
    for row in warm:  # first calls load grammars and language profiles
        verifier.verify(row["completion"], row["ground_truth"])
    start = time.perf_counter()
    verified = sum(verifier.verify(r["completion"], r["ground_truth"]) for r in rows)
    elapsed = time.perf_counter() - start
    return {
        "bench": "verifier_throughput",
        "verifier": name,
        "per_core_per_s": round(n / elapsed, 1),
        "ms_per_call": round(1000 * elapsed / n, 3),
        "n": n,
        "verified_fraction": round(verified / n, 3),
    }


def bench_pool(n: int, workers: int, seed: int) -> dict:
    rng = random.Random(seed)
    per = max(1, n // 3)
    rows = gsm8k_rows(per, rng) + math_rows(per, rng) + ifeval_rows(per, rng)
    with RewardScorer(workers=workers, timeout_s=30.0) as scorer:
        start = time.perf_counter()
        scorer.score(rows)
        elapsed = time.perf_counter() - start
        stats = scorer.stats
    return {
        "bench": "scorer_throughput",
        "workers": workers,
        "per_s": round(len(rows) / elapsed, 1),
        "n": len(rows),
        "timeouts": stats.timeouts,
        "errors": stats.errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny n, for CI")
    p.add_argument("--n", type=int, default=None, help="rows per verifier (default 2000; quick: 20)")
    p.add_argument("--workers", type=int, default=2, help="pool size for the pool figure")
    p.add_argument("--no-pool", action="store_true", help="skip the process-pool figure")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = args.n or (20 if args.quick else 2000)
    for name in MAKERS:
        print(json.dumps(bench_in_process(name, n, args.seed)), flush=True)
    if not args.no_pool:
        print(json.dumps(bench_pool(n, args.workers, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
