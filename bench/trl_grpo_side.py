"""The TRL side of bench/bench_grpo_vs_trl.py: TRL's ``GRPOTrainer`` on CPU, one process.

Runs in TRL's own virtual environment (bench/.venv-trl), which has no tulu. Rewards, 1.0 verified
or 0.0, one of two ways (``--verifiers``):

  ``gsm8k-copy`` (default; the arithmetic task): a pure-python copy of tulu's GSM8K verifier (the
        last number of the completion equals the ground truth, after the same number
        normalisation), in this process. Every row must name ``gsm8k`` (else it refuses to start).
  ``tulu`` (the embedded task mix): each row's ``dataset`` picks tulu's own verifier (gsm8k, MATH,
        ifeval), scored by ``tulu.rewards.RewardScorer`` exactly as our RLVR learner builds it
        (RewardConfig(verified 1.0, unverified 0.0), --verifier-workers worker processes, each call
        under --verifier-timeout-s, warmed for the datasets as the rows spell them, as ours). The
        scorer lives in one helper process of tulu's venv (``--tulu-python``; this file's
        ``--serve-verifiers`` mode), since the MATH and IFEval verifiers need math-verify, sympy
        and langdetect, which this venv lacks; each reward call sends the batch's completions there
        over a pipe and reads the verdicts. Its start-up (the workers' warm-up) is inside this
        side's end-to-end wall, as ours is.

    bench/.venv-trl/bin/python bench/trl_grpo_side.py --model SFT_HF_DIR --train PROMPTS.jsonl \\
        --out TRL_FINAL_DIR --result RESULT.json [--steps 300 --prompts-per-step 4 ...]
        [--verifiers tulu --tulu-python .venv/bin/python --tulu-root .]

Prompts are Ai2's RLVR rows (``messages``, ``ground_truth``); TRL renders them with the model's
chat template (conversational prompts), as tulu's PromptSet does; ``dataset`` (default gsm8k)
reaches the reward function as a column. One optimizer step consumes one generation batch of
prompts_per_step x num_generations completions. RESULT.json gets the per-step end timestamps (a
``TrainerCallback``), TRL's logged rewards, the versions used and, with ``--verifiers tulu``, the
scorer's counters (rows, verified, errors, time-outs per verifier).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

T_START = time.time()  # before the heavy imports: start-up is part of the end-to-end wall

# tulu.rewards.gsm8k's number pattern and normalisation, copied (this venv has no tulu).
_NUMBER = re.compile(
    r"(?:(?<![\w)\].])-)?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)", re.ASCII
)


def normalize_number(text: str) -> str:
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "")
    sign = ""
    if s[:1] in "+-":
        sign, s = ("-" if s[0] == "-" else ""), s[1:]
    if s.endswith("."):
        s = s[:-1]
    if "." in s:
        whole, _, frac = s.partition(".")
        frac = frac.rstrip("0")
        s = f"{whole}.{frac}" if frac else whole
    whole, dot, frac = s.partition(".")
    s = (whole.lstrip("0") or "0") + dot + frac
    return s if s == "0" else sign + s


def last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group(0) if last else None


def gsm8k_verified(completion: str, ground_truth: str) -> bool:
    gt = last_number(str(ground_truth).rsplit("####", 1)[-1])
    got = last_number(completion)
    return gt is not None and got is not None and normalize_number(got) == normalize_number(gt)


def completion_texts(completions) -> list[str]:
    return [c if isinstance(c, str) else c[-1]["content"] for c in completions]


def verified_reward(completions, ground_truth, **_) -> list[float]:
    """TRL reward function: 1.0 when tulu's GSM8K verifier would say verified, else 0.0."""
    texts = completion_texts(completions)
    return [1.0 if gsm8k_verified(t, g) else 0.0 for t, g in zip(texts, ground_truth, strict=True)]


class TuluVerifiers:
    """TRL reward function backed by tulu's ``RewardScorer`` in a helper process of tulu's venv
    (this file run there with ``--serve-verifiers``): one JSON line of rows out, one of verdicts back."""

    __name__ = "tulu_verified_reward"  # TRL names the reward's log keys after it

    def __init__(self, python: str, root: str, workers: int, timeout_s: float, verifiers: list[str]):
        spec = {"workers": workers, "timeout_s": timeout_s, "verifiers": verifiers}
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
        env["PYTHONPATH"] = str(root)
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--serve-verifiers", json.dumps(spec)],
                                     cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.stats = None
        if self._read() != "ready":
            raise RuntimeError("tulu's verifier helper did not start")

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tulu's verifier helper exited ({self.proc.poll()})")
        return json.loads(line)

    def __call__(self, completions, ground_truth, dataset, **_) -> list[float]:
        rows = [{"completion": t, "ground_truth": g, "dataset": d}
                for t, g, d in zip(completion_texts(completions), ground_truth, dataset, strict=True)]
        self.proc.stdin.write(json.dumps(rows) + "\n")
        self.proc.stdin.flush()
        return [1.0 if v else 0.0 for v in self._read()]

    def close(self) -> dict | None:
        """Stop the helper; returns the scorer's counters (rows, verified, errors, timeouts)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.stats = self._read()
            self.proc.wait(timeout=60)
        return self.stats


def serve_verifiers(spec_json: str) -> None:
    """``--serve-verifiers`` (run by tulu's python): tulu's RewardScorer over stdin/stdout."""
    spec = json.loads(spec_json)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed (here or by the workers, which inherit it) goes to stderr
    from tulu.rewards import RewardConfig, RewardScorer

    with RewardScorer(RewardConfig(verified_reward=1.0, unverified_reward=0.0), workers=spec["workers"],
                      timeout_s=spec["timeout_s"], verifiers=spec["verifiers"]) as scorer:
        out.write(json.dumps("ready") + "\n")
        out.flush()
        for line in sys.stdin:
            out.write(json.dumps([r.verified for r in scorer.score(json.loads(line))]) + "\n")
            out.flush()
        out.write(json.dumps(scorer.stats.as_dict()) + "\n")
        out.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF folder (weights + tokenizer with a chat template)")
    ap.add_argument("--train", required=True, help="RLVR-schema jsonl: messages, ground_truth")
    ap.add_argument("--out", required=True, help="where the final model + tokenizer are saved")
    ap.add_argument("--result", required=True, help="JSON file for timings, rewards and versions")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--adam-beta1", type=float, default=0.9)
    ap.add_argument("--adam-beta2", type=float, default=0.95)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--verifiers", choices=["gsm8k-copy", "tulu"], default="gsm8k-copy",
                    help="gsm8k-copy: the in-process GSM8K copy; tulu: tulu's verifiers by each row's dataset")
    ap.add_argument("--tulu-python", help="with --verifiers tulu: tulu's venv python")
    ap.add_argument("--tulu-root", help="with --verifiers tulu: the tulu repository (its PYTHONPATH)")
    ap.add_argument("--verifier-workers", type=int, default=2, help="our rlvr.verifier_workers")
    ap.add_argument("--verifier-timeout-s", type=float, default=10.0, help="our rlvr.verifier_timeout_s")
    a = ap.parse_args()
    if a.verifiers == "tulu" and not (a.tulu_python and a.tulu_root):
        ap.error("--verifiers tulu needs --tulu-python and --tulu-root")

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    t_imported = time.time()
    rows = [json.loads(x) for x in Path(a.train).read_text().splitlines() if x.strip()]
    data = datasets.Dataset.from_list([
        {"prompt": [m for m in r["messages"] if m["role"] != "assistant"], "ground_truth": str(r["ground_truth"]),
         "dataset": str(r.get("dataset", "gsm8k"))} for r in rows])
    names = sorted(set(data["dataset"]))
    if a.verifiers == "gsm8k-copy" and any(n.lower() != "gsm8k" for n in names):
        raise SystemExit(f"--verifiers gsm8k-copy scores gsm8k rows only; the prompts name {names} "
                         "(use --verifiers tulu)")
    # as our learner: the scorer is warmed for the datasets the prompts name, as they spell them
    reward = verified_reward if a.verifiers == "gsm8k-copy" else TuluVerifiers(
        a.tulu_python, a.tulu_root, a.verifier_workers, a.verifier_timeout_s, names)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    # tulu's engines stop at the tokenizer's end-of-text only; an exported config may name another
    # id as eos (TRL stops at the union of both), so make the model agree with the tokenizer.
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id

    batch = a.prompts_per_step * a.num_generations
    cfg = GRPOConfig(
        output_dir=str(Path(a.out).with_name(Path(a.out).name + "-trainer")),
        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=a.seed, data_seed=a.seed, dataloader_num_workers=0,
        max_steps=a.steps,
        # one generation batch (prompts x generations) per optimizer step, no accumulation
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=a.num_generations,
        steps_per_generation=1, num_iterations=1,
        max_completion_length=a.max_new_tokens, temperature=a.temperature, top_p=1.0, top_k=0,
        # TRL's GRPO default recomputes activations to save memory; a tiny model does not need
        # that, and ours does not do it, so the baseline gets the faster setting.
        gradient_checkpointing=False,
        use_vllm=False, beta=a.beta, epsilon=a.epsilon, loss_type=a.loss_type, scale_rewards="group",
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_epsilon=1e-8, max_grad_norm=a.max_grad_norm,
    )

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.ends, self.logs = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append({"step": state.global_step, "reward": logs["reward"],
                                  "completion_len": logs.get("completions/mean_length"),
                                  "clipped_ratio": logs.get("completions/clipped_ratio")})

    clock = StepClock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[clock])
    first = trainer.train_dataset[0]["prompt"]
    prompt_text = tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    t_train0 = time.time()
    trainer.train()
    t_train1 = time.time()
    trainer.save_model(a.out)
    tok.save_pretrained(a.out)
    verifier_stats = reward.close() if isinstance(reward, TuluVerifiers) else None
    t_end = time.time()
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "datasets": datasets.__version__},
        "torch_threads": torch.get_num_threads(),
        "completions_per_step": batch, "steps": len(clock.ends),
        "train_begin": clock.begin, "step_ends": clock.ends,
        "t_start": T_START, "t_imported": t_imported, "t_train0": t_train0, "t_train1": t_train1, "t_end": t_end,
        "rewards": clock.logs, "prompt_text_example": prompt_text,
        "verifiers": a.verifiers, "datasets": names, "verifier_stats": verifier_stats,
        "trainer_settings": {k: getattr(cfg, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
            "steps_per_generation", "num_generations", "max_completion_length", "temperature", "beta", "epsilon",
            "loss_type", "scale_rewards", "learning_rate", "lr_scheduler_type", "adam_beta2", "max_grad_norm",
            "num_iterations", "gradient_checkpointing")},
    }
    tmp = Path(a.result).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, a.result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-verifiers"]:
        serve_verifiers(sys.argv[2])
    else:
        main()
