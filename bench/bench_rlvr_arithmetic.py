"""Does RLVR raise held-out verified accuracy? The real pipeline on the local Slurm:

  1. SFT a tiny Llama on synthetic arithmetic (configs/tiny-cpu-sft.yaml) to a partial accuracy,
  2. RLVR (GRPO, configs/tiny-cpu-rlvr.yaml) starting from the SFT checkpoint,
  3. `tulu export` each checkpoint and measure greedy verified accuracy on the same held-out
     prompts (tulu.rlvr.evaluate).

One JSON line per figure, with the seeds. Needs the local Slurm (`bash slurm/local/start.sh`).

    python bench/bench_rlvr_arithmetic.py [--quick] [--workdir runs/bench-rlvr] [--rlvr-steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tulu(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tulu.cli", *args], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode != 0:
        raise SystemExit(f"tulu {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def accuracy(ckpt: Path, out: Path, prompts: Path, limit: int, engine: str) -> dict:
    tulu("export", str(ckpt), str(out))
    from tulu.rlvr.evaluate import evaluate

    return evaluate(out, prompts, limit=limit, engine=engine, max_new_tokens=24)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, not the gain")
    ap.add_argument("--workdir", default="runs/bench-rlvr")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--rlvr-steps", type=int, default=60)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--eval-limit", type=int, default=256)
    ap.add_argument("--sft-set", action="append", default=[], help="extra --set for the SFT run (model size...)")
    ap.add_argument("--rlvr-set", action="append", default=[], help="extra --set for the RLVR run")
    a = ap.parse_args()
    w = (REPO / a.workdir).resolve()
    sft_steps = a.sft_steps or (4 if a.quick else None)
    rlvr_steps = 2 if a.quick else a.rlvr_steps
    limit = 32 if a.quick else a.eval_limit
    seed = [f"run.seed={a.seed}", f"data.shuffle_seed={a.seed}"]
    sets = lambda items: [x for kv in items for x in ("--set", kv)]  # noqa: E731

    t0 = time.time()
    sft = [f"run.dir={w}/sft", *seed, *a.sft_set] + ([f"sft.max_steps={sft_steps}"] if sft_steps else [])
    tulu("submit", "configs/tiny-cpu-sft.yaml", *sets(sft), "--wait")
    sft_s = time.time() - t0
    from tulu.data import make_synthetic

    prompts = w / "heldout-rlvr.jsonl"
    make_synthetic("rlvr", limit, a.seed + 7919, prompts)
    before = accuracy(w / "sft" / "checkpoints", w / "sft-hf", prompts, limit, "transformers")
    print(json.dumps({"bench": "rlvr_arithmetic", "figure": "heldout_accuracy_after_sft", "accuracy": before["accuracy"],
                      "n": before["n"], "sft_seconds": round(sft_s, 1), "seed": a.seed, "sft_set": a.sft_set}), flush=True)

    t0 = time.time()
    rl = [f"run.dir={w}/rlvr", *seed, "model.tiny=null", f"model.name_or_path={w}/sft/checkpoints",
          f"rlvr.steps={rlvr_steps}", f"groups.inference.engine={a.engine}", "checkpoint.interval=1000000",
          *a.rlvr_set]
    tulu("submit", "configs/tiny-cpu-rlvr.yaml", *sets(rl), "--wait")
    rl_s = time.time() - t0
    after = accuracy(w / "rlvr" / "checkpoints", w / "rlvr-hf", prompts, limit, "transformers")
    metrics = [json.loads(x) for x in (w / "rlvr" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [m for m in metrics if m.get("kind") == "train"]
    first, last = train[: max(1, len(train) // 10)], train[-max(1, len(train) // 10):]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(json.dumps({"bench": "rlvr_arithmetic", "figure": "heldout_accuracy_after_rlvr", "accuracy": after["accuracy"],
                      "n": after["n"], "rlvr_steps": rlvr_steps, "rlvr_seconds": round(rl_s, 1), "engine": a.engine,
                      "seed": a.seed, "gain": round(after["accuracy"] - before["accuracy"], 4),
                      "rlvr_set": a.rlvr_set}), flush=True)
    print(json.dumps({"bench": "rlvr_arithmetic", "figure": "train_reward", "first_10pct_verified": mean(first, "verified_all"),
                      "last_10pct_verified": mean(last, "verified_all"),
                      "steps_per_s": round(len(train) / rl_s, 3)}), flush=True)
    steady = train[1:] or train  # the first step includes the engine's warm-up
    split = {k: round(mean(steady, k), 4) for k in ("weight_sync_s", "generate_s", "score_s", "train_s", "step_s")}
    print(json.dumps({"bench": "rlvr_arithmetic", "figure": "rl_step_phase_split_s", **split,
                      "generate_tokens_per_s": round(mean(steady, "generate_tokens_per_s")),
                      "note": "means over steps 2..N; weight_sync_s is the inference side's receive+load"}), flush=True)


if __name__ == "__main__":
    main()
