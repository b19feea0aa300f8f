"""Our RLVR (GRPO) against TRL's ``GRPOTrainer``, side by side on CPU: same tiny model, same
prompts, same group size, generations per step and RL steps; throughput and held-out accuracy.

    .venv/bin/python bench/bench_grpo_vs_trl.py [--quick] [--steps 300] [--engine transformers]
        [--ours-set rlvr.async_steps=1 ...] [--start-model HF_DIR] [--slurm] [--repeats N]
        [--task arithmetic|embedded] [--seed-per-repeat] [--rl-seed N]

Tasks (``--task``):
  ``arithmetic`` (default): 2-digit addition (`tulu.data.synthetic`, "rlvr"), every row scored by
        the GSM8K verifier; held-out prompts are a second seed's rows minus the training questions.
  ``embedded``: the embedded default's task mix (configs/tiny-cpu.yaml, `tulu.data.tasks`): the
        config's ``pipeline.tasks.names`` (gsm8k, math, ifeval) at the config's difficulty
        (``settings.tasks.difficulty()``, read at run time); --train-size and --eval-size split
        evenly over the tasks, training rows from the train split, held-out rows from the
        held-out split (disjoint from training by construction). A task with fewer distinct
        held-out prompts than its share (math at denominators 2..6 has 114) is capped at what
        exists, and the setup line says so (``heldout_capped``). Rows are scored by each row's
        ``dataset`` (gsm8k, MATH, ifeval) with tulu's verifiers on both sides: ours as always, TRL's
        through ``tulu.rewards.RewardScorer`` in a helper process of our venv (trl_grpo_side.py
        ``--verifiers tulu``). The start model is the embedded pipeline's SFT (or DPO) model,
        given as ``--start-model runs/<pipeline>/sft/hf`` (``--quick``: a random model of the
        config's shape, 256 positions); the bench does not SFT one. The RL response length and the
        eval budget default to the config's ``pipeline.eval.max_new_tokens`` (48), our engine's
        ``max_model_len`` to the start model's positions. The embedded pipeline's own RLVR differs
        from the bench defaults: 16 prompts x 4 samples, 160 steps, kl_beta 0.05 (pass them as
        --prompts-per-step/--num-generations/--steps/--kl-beta, they map as below), rollouts
        one step ahead (--ours-set rlvr.async_steps=1) and no_eos_penalty 1.0 (no TRL
        counterpart: 0 on both sides here). Lines carry
        ``"task": "embedded"`` and go to bench/results/grpo_vs_trl-embedded-cpu[-quick]-DATE.jsonl;
        held-out accuracy lines add ``per_task``.

1. The start model: a tiny Llama (our byte-level tokenizer) SFT'd briefly by our own pipeline
   (`tulu submit configs/tiny-cpu-sft.yaml`, `tulu export`), so it has partial accuracy. Both
   sides start from that one HF folder. ``--quick`` skips SFT: a randomly initialised model (it
   checks the pipeline, not the gain). ``--start-model`` reuses a folder from an earlier run.
2. Ours: `tulu submit configs/tiny-cpu-rlvr.yaml` (one inference + one training process, local
   executor unless ``--slurm``), then `tulu export` of its final checkpoint.
3. TRL: bench/trl_grpo_side.py in TRL's own venv (bench/.venv-trl, created on first use: CPU
   torch the way scripts/setup.sh installs it, then trl==--trl-version with its own deps).
4. Both final models: greedy held-out verified accuracy by our evaluator
   (`tulu.rlvr.evaluate`, transformers engine), on prompts disjoint from the training prompts.

Settings mapping (ours <- TRL GRPOConfig):
  rlvr.prompts_per_step x rlvr.samples_per_prompt  <- per_device_train_batch_size (= generation
        batch, steps_per_generation=1, gradient_accumulation_steps=1) / num_generations
  rlvr.response_length <- max_completion_length; rlvr.temperature <- temperature (top_p 1, top_k 0)
  rlvr.kl_beta (k3 estimator, in the loss) <- beta (k3, in the loss); 0 = no reference model
  rlvr.clip_eps <- epsilon; one update per batch on both (num_iterations=1), so ratio = 1
  rlvr.optim: lr, constant schedule, no warm-up, AdamW betas (0.9, 0.95), eps 1e-8, no weight
        decay, grad clip 1.0 <- learning_rate, lr_scheduler_type="constant", adam_beta*, max_grad_norm
  loss: ours sums the clipped token losses and Megatron divides by the response tokens of the
        whole global batch (token-level mean, DAPO) <- loss_type="dapo" (TRL 1.16's default).
  advantages: (r - group mean) / (group std + eps), Bessel std on both (eps 1e-6 ours, 1e-4 TRL)
        <- scale_rewards="group". Rewards: verified 1.0 / 0.0 on both (rlvr.verified_reward=1).
        Verifiers: arithmetic, a copy of our GSM8K verifier in TRL's process; embedded, our
        RewardScorer (rlvr.verifier_workers workers, rlvr.verifier_timeout_s per call) on both
        sides, TRL's in a helper process.
  Stop: both sides stop a completion at the tokenizer's end-of-text only (the TRL side resets
        the model's generation eos to the tokenizer's).
  TRL's GRPO default gradient_checkpointing=True is turned off (ours keeps activations too).
  Threads: ours runs 2 processes (inference, training) x 1 thread (cluster.cpus_per_task=1);
        TRL 1 process x --trl-threads (default 1: on the shared 2-core machine, at load ~7, TRL
        with 2 threads took 0.6-7.8 s per step against 0.19-0.31 s with 1, from OpenMP threads
        waiting on descheduled peers; pass --trl-threads 2 on an idle machine to check).
  Where the work differs (the same math, done once instead of several times, or elsewhere):
        ours decodes with a fused Llama forward and one prefill per prompt (TRL: `generate`, a
        prefill per sample); its training passes take each prompt once per GRPO group
        (rlvr.prompt_sharing, on by a FLOP estimate); ``--ours-set rlvr.async_steps=1`` overlaps
        generation with training (rollouts one step off-policy, corrected by the clipped ratio
        against the engine's log-probs; TRL's are on-policy); ``--ours-set
        rlvr.reference_logprobs=inference`` moves the frozen reference's forward to the engine's
        process (the learner then runs none).

Figures (one JSON line each): setup; held-out accuracy of the start model; per side throughput
(samples = completions per second: ``samples_per_s_steady`` over the steps after the first
10% from per-step timings, ``samples_per_s_end_to_end`` over the whole RL run's wall clock
including start-up and the final save, not the export/evaluation) and accuracy (after, gain,
gain per minute of end-to-end RL wall and of the step loop, the RL seed and each distinct
held-out prompt's verdict); the ours/TRL ratios, and with ``--repeats`` the per-repeat and median
ratios, each side's mean gain and ours minus TRL paired prompt by prompt over the repeats with its
SE (a sample over seeds with ``--seed-per-repeat``). Lines are
appended to bench/results/grpo_vs_trl-cpu[-quick]-DATE.jsonl (``--task embedded``:
grpo_vs_trl-embedded-cpu[-quick]-DATE.jsonl); every line has ``task``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = "grpo_vs_trl"
EMBEDDED_CONFIG = "configs/tiny-cpu.yaml"
TASKS = ("arithmetic", "embedded")


def run(cmd: list[str], what: str, env: dict | None = None) -> tuple[str, float]:
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout, time.time() - t0


def tulu(*args: str) -> tuple[str, float]:
    return run([sys.executable, "-m", "tulu.cli", *args], f"tulu {args[0]}",
               env=dict(os.environ, PYTHONPATH=str(REPO)))


def yfloat(x: float) -> str:
    """A float as YAML 1.1 reads it back as a float ("1e-4" would be a string there)."""
    return f"{float(x):.6e}"


def sets(items: list[str]) -> list[str]:
    return [x for kv in items for x in ("--set", kv)]


# ------------------------------------------------------------------ TRL's virtual environment
def ensure_trl_venv(venv: Path, trl_version: str) -> Path:
    """bench/.venv-trl with CPU torch (the version of our venv) and TRL; created once."""
    py = venv / "bin" / "python"
    probe = "import trl, torch; assert torch.version.cuda is None, 'CUDA torch in the TRL venv'"
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    print(f"[bench] creating {venv} ({torch_pin} CPU build, trl=={trl_version}); takes minutes once",
          file=sys.stderr, flush=True)
    python311 = shutil.which("python3.11") or sys.executable
    run([python311, "-m", "venv", str(venv)], "venv")
    pip = [str(py), "-m", "pip", "install", "-q"]
    # As scripts/setup.sh: pin torch first, so TRL's dependencies cannot pull a multi-GB CUDA build.
    # pip's configured find-links hold the CPU wheel here; elsewhere PyTorch's CPU index does.
    r = subprocess.run([*pip, torch_pin], capture_output=True, text=True)
    if r.returncode != 0:
        run([*pip, torch_pin, "--index-url", "https://download.pytorch.org/whl/cpu"], "pip install torch (CPU)")
    run([*pip, f"trl=={trl_version}"], f"pip install trl=={trl_version}")
    run([str(py), "-c", probe], "TRL venv check")
    return py


# ------------------------------------------------------------------ data and the start model
def make_prompts(w: Path, train_size: int, eval_size: int, seed: int) -> tuple[Path, Path]:
    """Training prompts (seed) and held-out prompts (seed + 7919) with no question in common."""
    from tulu.data.synthetic import synthetic_rows, write_jsonl

    train = synthetic_rows("rlvr", train_size, seed)
    seen = {r["messages"][0]["content"] for r in train}
    candidates = synthetic_rows("rlvr", eval_size * 2 + 200, seed + 7919)
    held = [r for r in candidates if r["messages"][0]["content"] not in seen]
    if len(held) < eval_size:
        raise SystemExit(f"only {len(held)} held-out prompts outside the training set; lower --eval-size")
    return write_jsonl(train, w / "train-rlvr.jsonl"), write_jsonl(held[:eval_size], w / "heldout-rlvr.jsonl")


def embedded_settings():
    """The embedded default's pipeline settings (task names, difficulty, eval budget), as the
    config says now."""
    from tulu.pipeline.config import load_pipeline

    return load_pipeline(str(REPO / EMBEDDED_CONFIG)).settings


def split_evenly(n: int, k: int) -> list[int]:
    return [n // k + (i < n % k) for i in range(k)]


def make_task_prompts(w: Path, train_size: int, eval_size: int, seed: int, names: list[str],
                      difficulty: dict) -> tuple[Path, Path, dict]:
    """--task embedded: `tulu.data.tasks` rows of each task (train split for training, held-out
    split for evaluation), sizes split evenly over the tasks; a task whose held-out split has fewer
    distinct prompts than its share gives all it has. Both files are shuffled (seeded) mixes."""
    from tulu.data.synthetic import write_jsonl
    from tulu.data.tasks import heldout_rows_up_to, task_rows

    train: list[dict] = []
    held: list[dict] = []
    info: dict = {"train_per_task": {}, "heldout_per_task": {}, "heldout_capped": {}}
    for task, n_train, n_held in zip(names, split_evenly(train_size, len(names)),
                                     split_evenly(eval_size, len(names))):
        train += task_rows(task, "train", n_train, seed, difficulty=difficulty)
        rows = heldout_rows_up_to(task, n_held, seed, difficulty=difficulty)
        if len(rows) < n_held:
            info["heldout_capped"][task] = {"asked": n_held, "distinct_heldout_prompts": len(rows)}
        held += rows
        info["train_per_task"][task], info["heldout_per_task"][task] = n_train, len(rows)
    seen = {r["messages"][0]["content"] for r in train}
    overlap = sum(r["messages"][0]["content"] in seen for r in held)
    if overlap:  # the split is by construction; a change in tulu.data.tasks could break it
        raise SystemExit(f"{overlap} held-out prompts also appear in training; tulu.data.tasks' split is broken")
    random.Random(f"bench:train:{seed}").shuffle(train)
    random.Random(f"bench:heldout:{seed}").shuffle(held)
    return (write_jsonl(train, w / "train-rlvr-embedded.jsonl"), write_jsonl(held, w / "heldout-rlvr-embedded.jsonl"),
            info)


def model_positions(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])


def random_start_model(out: Path, seed: int, max_positions: int = 128) -> Path:
    """--quick: a randomly initialised tiny Llama + our tokenizer as an HF folder."""
    import torch
    from transformers import LlamaForCausalLM

    from tulu.data.tokenizer import save_tiny_tokenizer
    from tulu.models.llama import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            max_position_embeddings=max_positions)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    save_tiny_tokenizer(out)
    return out


# The SFT model's shape: the RLVR config's tiny shape with 4 layers (~0.86M parameters). 600 SFT
# steps (~25 min on the shared 2-core machine) gave 0.04 greedy held-out accuracy at 8 new tokens;
# the same with data.synthetic_size=4096 (--sft-set) gave 0.10 at 8 and 0.22 at 32 in another run.
SFT_SHAPE = ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=344", "model.tiny.num_hidden_layers=4"]


def sft_start_model(w: Path, a) -> tuple[Path, float | None]:
    """SFT by our pipeline, exported; reused when this workdir already holds one made with the
    same settings (the stamp), since SFT costs more than either RL side."""
    sft = [f"run.dir={w}/sft", f"run.seed={a.seed}", f"data.shuffle_seed={a.seed}", f"sft.max_steps={a.sft_steps}",
           "data.synthetic_size=8192", "checkpoint.interval=1000000", *SFT_SHAPE, *a.sft_set]
    out, stamp_file = w / "start-hf", w / "start-hf.stamp.json"
    stamp = {"sft": sft}
    if out.is_dir() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        print(f"[bench] reusing the SFT start model {out} (same settings)", file=sys.stderr, flush=True)
        return out, None
    stamp_file.unlink(missing_ok=True)
    shutil.rmtree(w / "sft", ignore_errors=True)
    _, s = tulu("submit", "configs/tiny-cpu-sft.yaml", *sets([*sft, *a.executor_sets]), "--wait")
    shutil.rmtree(out, ignore_errors=True)
    tulu("export", str(w / "sft" / "checkpoints"), str(out))
    stamp_file.write_text(json.dumps(stamp))
    return out, s


def accuracy(model_dir: Path, heldout: Path, a, samples: Path | None = None) -> dict:
    """Greedy held-out accuracy; with ``samples``, also each prompt's verdict (``verdicts``: prompt ->
    0/1), so that two models can be compared prompt by prompt."""
    from tulu.rlvr.evaluate import evaluate

    r = evaluate(model_dir, heldout, limit=a.eval_size, engine="transformers", max_new_tokens=a.eval_max_new_tokens,
                 samples_out=samples)
    out = {"accuracy": r["accuracy"], "n": r["n"], "example": r["example"]}
    if samples is not None:
        rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
        out["verdicts"] = {x["prompt"]: int(x["verified"]) for x in rows}
    if a.task == "embedded":
        out["per_task"] = r["per_task"]
    return out


# ------------------------------------------------------------------ the two sides
def steady(durations: list[float]) -> list[float]:
    """Step times without the first 10% (at least one step when there are two or more): the
    first steps carry the engines' and allocators' warm-up."""
    skip = max(1, len(durations) // 10) if len(durations) > 1 else 0
    return durations[skip:]


def fresh(*paths: Path) -> None:
    """A side's run folder from an earlier benchmark would be resumed (checkpoints) or appended to."""
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def run_ours(w: Path, start: Path, train: Path, a, seed: int) -> dict:
    fresh(w / "ours", w / "ours-hf")
    rollouts = a.prompts_per_step * a.num_generations
    rl = [f"run.dir={w}/ours", f"run.seed={seed}", f"data.shuffle_seed={seed}", f"data.train={train}",
          "data.synthetic=null", "model.tiny=null", f"model.name_or_path={start}",
          f"rlvr.steps={a.steps}", f"rlvr.prompts_per_step={a.prompts_per_step}",
          f"rlvr.samples_per_prompt={a.num_generations}", f"rlvr.response_length={a.max_new_tokens}",
          f"rlvr.temperature={yfloat(a.temperature)}", f"rlvr.kl_beta={yfloat(a.kl_beta)}", "rlvr.kl_estimator=k3",
          f"rlvr.clip_eps={yfloat(a.epsilon)}", "rlvr.algorithm=grpo", "rlvr.verified_reward=1.0",
          "rlvr.unverified_reward=0.0",
          "rlvr.no_eos_penalty=0.0", f"rlvr.optim.lr={yfloat(a.lr)}", "rlvr.optim.lr_schedule=constant",
          "rlvr.optim.warmup_ratio=0.0", "rlvr.optim.weight_decay=0.0", "rlvr.optim.adam_beta1=0.9",
          "rlvr.optim.adam_beta2=0.95", "rlvr.optim.adam_eps=1.0e-8", "rlvr.optim.grad_clip=1.0",
          f"groups.inference.engine={a.engine}", f"groups.training.micro_batch_size={rollouts}",
          "checkpoint.interval=1000000", *a.task_sets, *a.executor_sets, *a.ours_set]
    _, wall = tulu("submit", "configs/tiny-cpu-rlvr.yaml", *sets(rl), "--wait")
    rows = [json.loads(x) for x in (w / "ours" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    out = w / "ours-hf"
    tulu("export", str(w / "ours" / "checkpoints"), str(out))
    return {"wall_s": wall, "step_s": [r["step_s"] for r in train_rows], "model": out,
            "train_reward": [r.get("verified_all", r.get("reward_mean")) for r in train_rows], "settings": rl}


def rlvr_default(name: str):
    """Our rlvr.<name> default (the bench leaves it to our side's config, which does not set it)."""
    from tulu.config.job import RLVRConfig

    return getattr(RLVRConfig(), name)


def run_trl(w: Path, start: Path, train: Path, py: Path, a, seed: int) -> dict:
    out, result = w / "trl-final", w / "trl-result.json"
    fresh(out, out.with_name(out.name + "-trainer"))
    result.unlink(missing_ok=True)
    cmd = [str(py), str(REPO / "bench" / "trl_grpo_side.py"), "--model", str(start), "--train", str(train),
           "--out", str(out), "--result", str(result), "--steps", str(a.steps),
           "--prompts-per-step", str(a.prompts_per_step), "--num-generations", str(a.num_generations),
           "--max-new-tokens", str(a.max_new_tokens), "--temperature", str(a.temperature), "--lr", str(a.lr),
           "--beta", str(a.kl_beta), "--epsilon", str(a.epsilon), "--loss-type", "dapo", "--seed", str(seed),
           "--threads", str(a.trl_threads)]
    if a.task == "embedded":  # each row's dataset -> our verifiers, by our RewardScorer as our RLVR builds it
        cmd += ["--verifiers", "tulu", "--tulu-python", sys.executable, "--tulu-root", str(REPO),
                "--verifier-workers", str(rlvr_default("verifier_workers")),
                "--verifier-timeout-s", str(rlvr_default("verifier_timeout_s"))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    threads = str(a.trl_threads)
    _, wall = run(cmd, "TRL side", env=dict(env, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=threads,
                                            MKL_NUM_THREADS=threads))
    r = json.loads(result.read_text())
    ends = [r["train_begin"], *r["step_ends"]]
    return {"wall_s": wall, "step_s": [b - e for e, b in zip(ends, ends[1:])], "model": out,
            "train_reward": [x["reward"] for x in r["rewards"]], "result": r}


def side_figures(name: str, side: dict, before: dict, after: dict, a) -> list[dict]:
    per_step = a.prompts_per_step * a.num_generations
    st = steady(side["step_s"])
    n_steps = len(side["step_s"])
    loop_s = sum(side["step_s"])
    gain = after["accuracy"] - before["accuracy"]
    rew = side["train_reward"]
    k = max(1, len(rew) // 10)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    acc_extra = {"per_task_before": before["per_task"], "per_task_after": after["per_task"]} \
        if "per_task" in after else {}
    return [
        {"bench": BENCH, "figure": f"{name}_throughput", "side": name,
         "samples_per_s_steady": round(per_step * len(st) / sum(st), 2) if st else None,
         "samples_per_s_end_to_end": round(per_step * n_steps / side["wall_s"], 2),
         "steps": n_steps, "samples_per_step": per_step, "steady_steps": len(st),
         "step_s_steady_mean": round(sum(st) / len(st), 4) if st else None,
         "step_loop_s": round(loop_s, 1), "wall_s_end_to_end": round(side["wall_s"], 1),
         "startup_and_shutdown_s": round(side["wall_s"] - loop_s, 1)},
        {"bench": BENCH, "figure": f"{name}_heldout_accuracy", "side": name,
         "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"], "gain": round(gain, 4),
         "gain_per_min_end_to_end": round(gain / (side["wall_s"] / 60), 4),
         "gain_per_min_step_loop": round(gain / (loop_s / 60), 4) if loop_s else None,
         "n": after["n"], "train_verified_first_10pct": mean(rew[:k]), "train_verified_last_10pct": mean(rew[-k:]),
         "example_after": after["example"], **acc_extra},
    ]


def gain_comparison(ours: list[dict[str, int]], trl: list[dict[str, int]]) -> dict:
    """Ours minus TRL in held-out accuracy after RL, paired prompt by prompt over all repeats (both
    sides start from one model, so this is also the difference of their gains); SE = sd of the
    per-prompt difference / sqrt(n). Prompts are keyed by their text: one the held-out file holds
    twice (the arithmetic file has 247 distinct prompts in 256) is counted once, as greedy decoding
    gives both copies one verdict. Repeats of one seed repeat the same verdicts, so the SE only
    means something across seeds (--seed-per-repeat)."""
    diffs = [o[p] - t[p] for o, t in zip(ours, trl) for p in o.keys() & t.keys()]
    if len(diffs) < 2:
        return {}
    return {"gain_paired_n": len(diffs), "gain_ours_minus_trl_mean": round(statistics.fmean(diffs), 4),
            "gain_ours_minus_trl_se": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 4)}


def tree_state() -> dict:
    """The commit and the uncommitted paths of the code under test (the tree is shared)."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""
    dirty = [line[3:] for line in git("status", "--porcelain", "tulu", "configs").splitlines() if line.strip()]
    return {"git_commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_in_tulu_configs": dirty}


def ratio(x, y):
    return round(x / y, 3) if x is not None and y not in (None, 0) else None


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="random start model, 3 steps, 16 eval prompts: checks the "
                    "pipeline, not the gain")
    ap.add_argument("--task", choices=TASKS, default="arithmetic", help="arithmetic: 2-digit addition (today's "
                    f"bench); embedded: the task mix of {EMBEDDED_CONFIG} at its difficulty (see the module doc)")
    ap.add_argument("--workdir", default=None, help="default runs/bench-grpo-vs-trl (--task embedded: "
                    "runs/bench-grpo-vs-trl-embedded)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=None, help="RL steps on each side (default 400; --quick 3)")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8, help="completions per prompt (the GRPO group)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length in RL (default 8; "
                    "--task embedded: the config's pipeline.eval.max_new_tokens)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl-beta", type=float, default=0.0, help="TRL's beta / our rlvr.kl_beta (0: no reference)")
    ap.add_argument("--epsilon", type=float, default=0.2, help="clip range (TRL's epsilon, our rlvr.clip_eps)")
    ap.add_argument("--train-size", type=int, default=512, help="training prompts")
    ap.add_argument("--eval-size", type=int, default=None, help="held-out prompts (default 256; --quick 16)")
    ap.add_argument("--eval-max-new-tokens", type=int, default=None, help="greedy eval budget (default: the RL "
                    "response length, so the eval scores what RL could see)")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--sft-set", action="append", default=[], help="extra --set for the SFT run")
    ap.add_argument("--start-model", help="an HF folder to start both sides from (skips SFT); --task embedded "
                    "needs one unless --quick: the embedded pipeline's runs/<pipeline>/sft/hf or .../dpo/hf")
    ap.add_argument("--engine", default="transformers", choices=["transformers", "vllm"], help="our inference engine")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for our RLVR run, applied last (repeatable)")
    ap.add_argument("--slurm", action="store_true", help="run our jobs on the local Slurm (default: local executor)")
    ap.add_argument("--trl-venv", default="bench/.venv-trl")
    ap.add_argument("--trl-version", default="1.16.0")
    ap.add_argument("--trl-threads", type=int, default=1, help="torch threads of the TRL process (default 1: on "
                    "a loaded 2-core machine 2 threads made TRL's steps 3-30x slower; ours runs 1 per process)")
    ap.add_argument("--sides", default="ours,trl", help="which sides to run (comma list; ratios need both)")
    ap.add_argument("--repeats", type=int, default=1, help="run the sides this many times, alternating their "
                    "order (ours, trl, trl, ours, ...); the ratio line then also gives the median of the per-repeat "
                    "ratios, which a VM whose speed drifts over minutes moves less than a single pair")
    ap.add_argument("--seed-per-repeat", action="store_true",
                    help="repeat r trains both sides with RL seed --seed + r (sampling and prompt order; the "
                         "prompts and the start model stay those of --seed), so the held-out gains are a sample "
                         "over seeds, compared prompt by prompt, instead of one seeded number repeated")
    ap.add_argument("--rl-seed", type=int, default=None,
                    help="the RL seed of the first repeat (default --seed): more seeds over the same prompts "
                         "and start model, e.g. --rl-seed 1237 --seed-per-repeat after a run of --seed 1234")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/")
    a = ap.parse_args()
    a.steps = a.steps or (3 if a.quick else 400)
    a.eval_size = a.eval_size or (16 if a.quick else 256)
    a.workdir = a.workdir or ("runs/bench-grpo-vs-trl" + ("-embedded" if a.task == "embedded" else ""))
    embedded = embedded_settings() if a.task == "embedded" else None
    if embedded and not (a.start_model or a.quick):
        raise SystemExit(f"--task embedded needs --start-model (the SFT'd model of the embedded pipeline, e.g. "
                         f"runs/<pipeline>/sft/hf after `tulu pipeline {EMBEDDED_CONFIG}`) or --quick")
    a.max_new_tokens = a.max_new_tokens or (embedded.eval.max_new_tokens if embedded else 8)
    a.eval_max_new_tokens = a.eval_max_new_tokens or a.max_new_tokens
    a.executor_sets = [] if a.slurm else ["cluster.executor=local"]
    sides = [s for s in a.sides.split(",") if s]
    if not set(sides) <= {"ours", "trl"} or not sides:
        raise SystemExit(f"--sides: got {a.sides!r}; use a comma list of 'ours' and 'trl'")
    if a.repeats < 1:
        raise SystemExit(f"--repeats: got {a.repeats}; use >= 1")

    t_bench = time.time()
    stamp = datetime.now(timezone.utc)
    w = (REPO / a.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    lines: list[dict] = []

    def emit(d: dict) -> None:
        d = {**d, "task": a.task, "time": stamp.isoformat(timespec="seconds")}
        lines.append(d)
        print(json.dumps(d), flush=True)

    trl_py = ensure_trl_venv((REPO / a.trl_venv).resolve(), a.trl_version) if "trl" in sides else None
    task_info: dict = {}
    if embedded:
        t = embedded.tasks
        task_info = {"task_config": EMBEDDED_CONFIG, "task_names": list(t.names), "difficulty": t.difficulty()}
        train, heldout, counts = make_task_prompts(w, a.train_size, a.eval_size, a.seed, list(t.names),
                                                   t.difficulty())
        task_info.update(counts)
        n_held = sum(counts["heldout_per_task"].values())
        if counts["heldout_capped"]:
            print(f"[bench] held-out prompts capped at what exists: {counts['heldout_capped']}; "
                  f"{n_held} held-out prompts in all", file=sys.stderr, flush=True)
    else:
        train, heldout = make_prompts(w, a.train_size, a.eval_size, a.seed)
        n_held = a.eval_size
    sft_s = None
    if a.start_model:
        start = Path(a.start_model).resolve()
    elif a.quick:
        start = random_start_model(w / "start-hf", a.seed, max_positions=256 if embedded else 128)
    else:
        start, sft_s = sft_start_model(w, a)
    # embedded: prompts (< 90 bytes + the chat template) and 48-token answers need more than the RLVR
    # config's 128 positions; our engine takes what the start model can
    a.task_sets = [f"groups.inference.max_model_len={model_positions(start)}"] if embedded else []
    before = accuracy(start, heldout, a)

    import torch
    import transformers

    ours_versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import megatron.core

        ours_versions["megatron_core"] = megatron.core.__version__
    except ImportError:
        pass
    emit({"bench": BENCH, "figure": "setup", **tree_state(), "quick": a.quick, "machine": f"cpu x{os.cpu_count()}",
          "platform": platform.platform(), "steps": a.steps, "prompts_per_step": a.prompts_per_step,
          "num_generations": a.num_generations, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
          "lr": a.lr, "kl_beta": a.kl_beta, "epsilon": a.epsilon, "loss": "token-mean over the global batch (dapo)",
          "train_prompts": a.train_size, "eval_prompts": n_held, "eval_max_new_tokens": a.eval_max_new_tokens,
          **task_info, "ours_task_set": a.task_sets,
          "engine_ours": a.engine, "executor": "slurm" if a.slurm else "local", "ours_set": a.ours_set,
          "seed": a.seed, "rl_seed": a.seed if a.rl_seed is None else a.rl_seed, "seed_per_repeat": a.seed_per_repeat,
          "start_model": str(start), "sft_steps": None if (a.start_model or a.quick) else a.sft_steps,
          "sft_s": round(sft_s, 1) if sft_s else None,
          "trl_threads": a.trl_threads if "trl" in sides else None, "versions_ours": ours_versions})
    emit({"bench": BENCH, "figure": "heldout_accuracy_start", "accuracy": before["accuracy"], "n": before["n"],
          "example": before["example"], **({"per_task": before["per_task"]} if "per_task" in before else {})})

    rounds: list[dict[str, list[dict]]] = []
    verdicts: dict[str, list[dict[str, int]]] = {name: [] for name in sides}
    for r in range(a.repeats):
        figs: dict[str, list[dict]] = {}
        rl_seed = (a.seed if a.rl_seed is None else a.rl_seed) + (r if a.seed_per_repeat else 0)
        for name in (sides if r % 2 == 0 else sides[::-1]):
            load0 = os.getloadavg()
            side = run_ours(w, start, train, a, rl_seed) if name == "ours" else \
                run_trl(w, start, train, trl_py, a, rl_seed)
            load1 = os.getloadavg()
            after = accuracy(side["model"], heldout, a, samples=w / f"heldout-{name}.jsonl")
            verdicts[name].append(after.pop("verdicts"))
            figs[name] = side_figures(name, side, before, after, a)
            figs[name][1]["rl_seed"] = rl_seed
            # one 0/1 per distinct held-out prompt, in sorted prompt order: runs over the same prompts
            # (more seeds later, --rl-seed) can be paired prompt by prompt from the results file
            figs[name][1]["verified_by_sorted_prompt"] = "".join(str(v) for _, v in sorted(verdicts[name][-1].items()))
            figs[name][0]["load_avg_1_5_15_before"] = [round(x, 2) for x in load0]
            figs[name][0]["load_avg_1_5_15_after"] = [round(x, 2) for x in load1]
            if name == "trl":
                figs[name][0]["versions"] = side["result"]["versions"]
                figs[name][0]["torch_threads"] = side["result"]["torch_threads"]
                figs[name][0]["trl_settings"] = side["result"]["trainer_settings"]
                if side["result"].get("verifier_stats"):  # --task embedded: our scorer's counters there
                    figs[name][0]["trl_verifier_stats"] = side["result"]["verifier_stats"]
            for f in figs[name]:
                emit({**f, "repeat": r} if a.repeats > 1 else f)
        rounds.append(figs)

    if len(sides) == 2:
        per = [ratio(f["ours"][0]["samples_per_s_steady"], f["trl"][0]["samples_per_s_steady"]) for f in rounds]
        per_e2e = [ratio(f["ours"][0]["samples_per_s_end_to_end"], f["trl"][0]["samples_per_s_end_to_end"])
                   for f in rounds]
        (ot, oa), (tt, ta) = rounds[-1]["ours"], rounds[-1]["trl"]
        out = {"bench": BENCH, "figure": "ratio_ours_over_trl",
               "samples_per_s_steady": ratio(ot["samples_per_s_steady"], tt["samples_per_s_steady"]),
               "samples_per_s_end_to_end": ratio(ot["samples_per_s_end_to_end"], tt["samples_per_s_end_to_end"]),
               "gain_per_min_end_to_end": ratio(oa["gain_per_min_end_to_end"], ta["gain_per_min_end_to_end"])
               if ta["gain"] > 0 else None,
               "gain_per_min_step_loop": ratio(oa["gain_per_min_step_loop"], ta["gain_per_min_step_loop"])
               if ta["gain"] > 0 else None,
               "gain_ours_minus_trl": round(oa["gain"] - ta["gain"], 4),
               "target": "ours >= 2x TRL samples/s at equal or better accuracy gain",
               "note": "gain-per-minute ratios are null when TRL's gain is <= 0 (undefined)",
               "bench_wall_s": round(time.time() - t_bench, 1)}
        if a.repeats > 1:
            out.update({"note_repeats": "the single-run fields are the last repeat's",
                        "samples_per_s_steady_per_repeat": per, "samples_per_s_end_to_end_per_repeat": per_e2e,
                        "samples_per_s_steady_median": statistics.median(per),
                        "samples_per_s_end_to_end_median": statistics.median(per_e2e),
                        "gain_ours_minus_trl_per_repeat": [round(f["ours"][1]["gain"] - f["trl"][1]["gain"], 4)
                                                           for f in rounds],
                        "gain_ours_mean": round(statistics.fmean(f["ours"][1]["gain"] for f in rounds), 4),
                        "gain_trl_mean": round(statistics.fmean(f["trl"][1]["gain"] for f in rounds), 4),
                        **gain_comparison(verdicts["ours"], verdicts["trl"])})
        emit(out)
    if not a.no_save:
        kind = ("embedded-" if a.task == "embedded" else "") + ("cpu-quick" if a.quick else "cpu")
        path = REPO / "bench" / "results" / f"{BENCH}-{kind}-{stamp.date().isoformat()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.writelines(json.dumps(d) + "\n" for d in lines)
        print(f"[bench] appended {len(lines)} lines to {path.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
