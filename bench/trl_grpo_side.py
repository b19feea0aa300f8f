"""The TRL side of bench/bench_grpo_vs_trl.py: TRL's ``GRPOTrainer`` on CPU, one process.

Runs in TRL's own virtual environment (bench/.venv-trl), so it imports nothing from tulu: the
reward is a pure-python copy of tulu's GSM8K verifier (the last number of the completion equals
the ground truth, after the same number normalisation), scoring 1.0 or 0.0.

    bench/.venv-trl/bin/python bench/trl_grpo_side.py --model SFT_HF_DIR --train PROMPTS.jsonl \\
        --out TRL_FINAL_DIR --result RESULT.json [--steps 300 --prompts-per-step 4 ...]

Prompts are Ai2's RLVR rows (``messages``, ``ground_truth``); TRL renders them with the model's
chat template (conversational prompts), as tulu's PromptSet does. One optimizer step consumes
one generation batch of prompts_per_step x num_generations completions. RESULT.json gets the
per-step end timestamps (a ``TrainerCallback``), TRL's logged rewards and the versions used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def verified_reward(completions, ground_truth, **_) -> list[float]:
    """TRL reward function: 1.0 when tulu's GSM8K verifier would say verified, else 0.0."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if gsm8k_verified(t, g) else 0.0 for t, g in zip(texts, ground_truth, strict=True)]


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
    a = ap.parse_args()

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
        {"prompt": [m for m in r["messages"] if m["role"] != "assistant"], "ground_truth": str(r["ground_truth"])}
        for r in rows])
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
    trainer = GRPOTrainer(model=model, reward_funcs=verified_reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[clock])
    first = trainer.train_dataset[0]["prompt"]
    prompt_text = tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    t_train0 = time.time()
    trainer.train()
    t_train1 = time.time()
    trainer.save_model(a.out)
    tok.save_pretrained(a.out)
    t_end = time.time()
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "datasets": datasets.__version__},
        "torch_threads": torch.get_num_threads(),
        "completions_per_step": batch, "steps": len(clock.ends),
        "train_begin": clock.begin, "step_ends": clock.ends,
        "t_start": T_START, "t_imported": t_imported, "t_train0": t_train0, "t_train1": t_train1, "t_end": t_end,
        "rewards": clock.logs, "prompt_text_example": prompt_text,
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
    main()
