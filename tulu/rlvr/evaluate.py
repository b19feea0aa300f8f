"""Held-out verified accuracy of a model folder (a `tulu export` output or any HF Llama folder):
greedy completions of RLVR-schema prompts, scored by the verifiers.

    python -m tulu.rlvr.evaluate MODEL_DIR PROMPTS.jsonl [--limit 256] [--engine transformers]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def evaluate(model_dir: str | Path, prompts_file: str | Path, *, limit: int | None = 256,
             engine: str = "transformers", max_new_tokens: int = 32, max_model_len: int = 512,
             workers: int = 2, samples_out: str | Path | None = None) -> dict:
    """``samples_out``: also write every prompt's completion and verdict there (JSON lines)."""
    from transformers import AutoTokenizer

    from tulu.inference.engine import SamplingSettings, make_engine
    from tulu.rewards import RewardScorer
    from tulu.rl.reward import verifier_accuracy
    from tulu.rlvr.prompts import PromptSet, read_rows

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_set = PromptSet(read_rows(Path(prompts_file))[:limit], tokenizer, seed=0,
                           max_prompt_tokens=max_model_len - max_new_tokens)
    prompts = prompt_set.prompts
    eng = make_engine(engine, model_dir, max_model_len=max_model_len, seed=0)
    try:
        outs = eng.generate([p.token_ids for p in prompts], n=1, sampling=SamplingSettings(
            temperature=0.0, max_new_tokens=max_new_tokens, seed=0, stop_token_ids=(tokenizer.eos_token_id,)))
    finally:
        eng.close()
    rows = [{"completion": tokenizer.decode(o.token_ids, skip_special_tokens=True),
             "dataset": prompts[o.prompt_index].dataset, "ground_truth": prompts[o.prompt_index].ground_truth}
            for o in outs]
    import torch

    with RewardScorer(workers=workers) as scorer:
        results = scorer.score(rows)
    acc = verifier_accuracy(torch.tensor([float(r.verified) for r in results]), [r["dataset"] for r in rows])
    # Per task under the verifier's registry name ("MATH" and "math" are one task), with its n.
    per_task: dict[str, dict] = {}
    examples: dict[str, str] = {}
    for row, res in zip(rows, results):
        t = per_task.setdefault(res.verifier, {"n": 0, "verified": 0})
        t["n"] += 1
        t["verified"] += int(res.verified)
        examples.setdefault(res.verifier, row["completion"])
    if samples_out is not None:
        _write_samples(Path(samples_out), prompts, outs, rows, results, tokenizer)
    per_task = {k: {"n": v["n"], "accuracy": v["verified"] / v["n"]} for k, v in sorted(per_task.items())}
    return {"n": len(rows), "accuracy": acc["all"], "per_verifier": acc, "example": rows[0]["completion"],
            "per_task": per_task, "examples": examples, "skipped": prompt_set.skipped}


def _write_samples(path: Path, prompts, outs, rows, results, tokenizer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for o, row, res in zip(outs, rows, results):
            prompt = tokenizer.decode(prompts[o.prompt_index].token_ids, skip_special_tokens=True)
            f.write(json.dumps({"task": res.verifier, "verified": bool(res.verified), "prompt": prompt,
                                "completion": row["completion"], "ground_truth": row["ground_truth"]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tulu.rlvr.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("prompts")
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--samples-out", help="write each prompt, completion and verdict here (JSON lines)")
    a = p.parse_args(argv)
    print(json.dumps(evaluate(a.model_dir, a.prompts, limit=a.limit, engine=a.engine,
                              max_new_tokens=a.max_new_tokens, samples_out=a.samples_out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
