"""On-policy DPO pairs, as Tülu 3 made its RLVR-style ones: sample the SFT model several times per
prompt, let the verifiers judge, and pair a verified sample (chosen) with an unverified one
(rejected).

    stats = make_onpolicy_pairs("run/sft-hf", "data/rlvr_train.jsonl", "run/dpo_pairs.jsonl")
    python -m tulu.pipeline.pairs run/sft-hf data/rlvr_train.jsonl run/dpo_pairs.jsonl --samples 4

Prompts are rows in Ai2's RLVR schema (``messages`` without the answer, ``ground_truth``,
``dataset`` naming the verifier). Per prompt:

- some samples verified and some not: up to ``pairs_per_prompt`` pairs, each of a distinct
  verified and a distinct unverified sample, picked by a generator seeded with ``(seed, row)``;
- none verified: with ``fallback_chosen="ground_truth_sft"`` and a reference answer for the
  prompt, one pair of (reference, an unverified sample); the reference must itself pass the
  verifier, or the prompt gives no pair (counted in ``fallback_reference_unverified``);
- all verified, or none verified without a reference: no pair.

The reference answer is the row's ``"reference"`` field (an assistant reply string) or, when the
row has none, the last assistant reply of the row in ``sft_jsonl`` whose user messages are the
same (the SFT set the model was trained on, so the pipeline passes it as is).

A sample whose scoring failed (time-out, worker crash) is neither chosen nor rejected: it is not
known to be wrong. Output rows are what :mod:`tulu.data.preference` reads: ``{"prompt": last user
text, "chosen": [...prompt messages, assistant], "rejected": [...], "dataset", "pair_source":
"onpolicy" | "fallback"}``, written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FALLBACK_CHOICES = ("ground_truth_sft",)
CHUNK_PROMPTS = 32
"""Prompts generated (and scored) together. Fixed: the sampling seed of a chunk depends on its
first row, so a different chunk size would draw different samples."""


@dataclass(slots=True)
class _Prompt:
    row: int
    messages: list[dict]
    token_ids: list[int]
    dataset: str
    ground_truth: object
    reference: str | None


@dataclass(slots=True)
class _Sample:
    text: str
    verified: bool
    scored: bool        # False when scoring failed (time-out, crash): neither chosen nor rejected
    truncated: bool


@dataclass(slots=True)
class _TaskCounts:
    prompts: int = 0
    samples: int = 0
    verified: int = 0
    pairs: int = 0


@dataclass(slots=True)
class _Counts:
    per_task: dict[str, _TaskCounts] = field(default_factory=dict)
    pairs_onpolicy: int = 0
    pairs_fallback: int = 0
    prompts_all_verified: int = 0
    prompts_none_verified: int = 0
    no_reference: int = 0
    fallback_reference_unverified: int = 0
    score_errors: int = 0
    truncated: int = 0


def _chunk_seed(seed: int, first_row: int) -> int:
    digest = hashlib.blake2b(f"pairs/{seed}/{first_row}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _user_key(messages: list[dict]) -> str:
    return json.dumps([m.get("content") for m in messages if m.get("role") == "user"], ensure_ascii=False)


def read_sft_answers(sft_jsonl: str | Path) -> dict[str, str]:
    """``{user messages (as a key): the last assistant reply}`` from an SFT jsonl (``messages``)."""
    answers: dict[str, str] = {}
    for line in Path(sft_jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line).get("messages") or []
        replies = [m for m in messages if m.get("role") == "assistant"]
        if replies and isinstance(replies[-1].get("content"), str):
            answers.setdefault(_user_key(messages), replies[-1]["content"])
    return answers


def _load_prompts(prompts_jsonl: Path, tokenizer, max_prompt_tokens: int, limit: int | None,
                  sft_answers: dict[str, str]) -> tuple[list[_Prompt], int]:
    """Rows rendered as PromptSet does (chat template + generation prompt); returns (prompts, skipped)."""
    from tulu.data.chat import ChatFormat
    from tulu.rlvr.prompts import read_rows

    fmt = ChatFormat(tokenizer)
    prompts, skipped = [], 0
    for i, row in enumerate(read_rows(prompts_jsonl)[:limit]):
        messages = [m for m in row.get("messages", []) if m.get("role") != "assistant"]
        if not messages or "ground_truth" not in row or "dataset" not in row:
            skipped += 1
            continue
        ids = tokenizer(fmt.render(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        reference = row.get("reference")
        if not isinstance(reference, str):
            reference = sft_answers.get(_user_key(messages))
        prompts.append(_Prompt(i, messages, ids, str(row["dataset"]), row["ground_truth"], reference))
    if not prompts:
        raise ValueError(f"{prompts_jsonl}: no usable prompts ({skipped} rows skipped: missing messages, "
                         f"ground_truth or dataset, or longer than {max_prompt_tokens} tokens)")
    return prompts, skipped


class _Progress:
    """A tqdm bar on a terminal, and a compact line every ``every`` of the way for log files."""

    def __init__(self, total: int, enabled: bool, every: float = 0.1):
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.perf_counter()
        self.step = max(1, int(total * every))
        self.next_line = self.step
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="on-policy pairs", file=sys.stderr)

    def update(self, n: int, verified: int, pairs: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(verified=verified, pairs=pairs, refresh=False)
        elif self.done >= self.next_line or self.done == self.total:
            elapsed = time.perf_counter() - self.start
            print(f"[pairs] {self.done}/{self.total} samples ({100 * self.done / self.total:.0f}%) "
                  f"verified {verified} pairs {pairs} {self.done / max(elapsed, 1e-9):.1f} samples/s",
                  file=sys.stderr, flush=True)
            while self.next_line <= self.done:
                self.next_line += self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _assistant(prompt: _Prompt, text: str) -> list[dict]:
    return [*prompt.messages, {"role": "assistant", "content": text}]


def _pairs_for(prompt: _Prompt, samples: list[_Sample], reference_ok: bool, *, seed: int, pairs_per_prompt: int,
               fallback: bool, counts: _Counts) -> list[dict]:
    rng = random.Random(f"{seed}/{prompt.row}")
    good = [s for s in samples if s.scored and s.verified]
    bad = [s for s in samples if s.scored and not s.verified]
    rng.shuffle(good)
    rng.shuffle(bad)
    if good and not bad:
        counts.prompts_all_verified += 1
    user = next((m["content"] for m in reversed(prompt.messages) if m.get("role") == "user"), "")
    base = {"prompt": user, "dataset": prompt.dataset}
    if good and bad:
        k = min(pairs_per_prompt, len(good), len(bad))
        counts.pairs_onpolicy += k
        return [{**base, "chosen": _assistant(prompt, g.text), "rejected": _assistant(prompt, b.text),
                 "pair_source": "onpolicy"} for g, b in zip(good[:k], bad[:k])]
    if good or not bad:
        return []
    counts.prompts_none_verified += 1
    if not fallback:
        return []
    if prompt.reference is None:
        counts.no_reference += 1
        return []
    if not reference_ok:
        counts.fallback_reference_unverified += 1
        return []
    counts.pairs_fallback += 1
    return [{**base, "chosen": _assistant(prompt, prompt.reference), "rejected": _assistant(prompt, bad[0].text),
             "pair_source": "fallback"}]


def _chunk_pairs(chunk: list[_Prompt], eng, scorer, tokenizer, sampling, *, samples_per_prompt: int,
                 pairs_per_prompt: int, fallback: bool, seed: int, counts: _Counts, timing: dict) -> list[dict]:
    """Sample, score and pair one chunk of prompts; counts and times go into ``counts``/``timing``."""
    t0 = time.perf_counter()
    outs = eng.generate([p.token_ids for p in chunk], n=samples_per_prompt, sampling=sampling)
    t1 = time.perf_counter()
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    to_score = [{"completion": text, "dataset": chunk[o.prompt_index].dataset,
                 "ground_truth": chunk[o.prompt_index].ground_truth} for o, text in zip(outs, texts)]
    # The fallback reference is scored too: a reference that fails its verifier is no "chosen".
    ref_at = {}
    for i, p in enumerate(chunk):
        if fallback and p.reference is not None:
            ref_at[i] = len(to_score)
            to_score.append({"completion": p.reference, "dataset": p.dataset, "ground_truth": p.ground_truth})
    results = scorer.score(to_score)
    timing["generate_s"] += t1 - t0
    timing["score_s"] += time.perf_counter() - t1
    per_prompt: list[list[_Sample]] = [[] for _ in chunk]
    for o, text, res in zip(outs, texts, results):
        per_prompt[o.prompt_index].append(_Sample(text, res.verified, res.error is None, o.finish_reason == "length"))
    rows = []
    for i, (p, samples) in enumerate(zip(chunk, per_prompt)):
        task = counts.per_task.setdefault(results[i * samples_per_prompt].verifier, _TaskCounts())
        task.prompts += 1
        task.samples += len(samples)
        task.verified += sum(s.verified for s in samples)
        counts.score_errors += sum(not s.scored for s in samples)
        counts.truncated += sum(s.truncated for s in samples)
        made = _pairs_for(p, samples, i in ref_at and results[ref_at[i]].verified, seed=seed,
                          pairs_per_prompt=pairs_per_prompt, fallback=fallback, counts=counts)
        task.pairs += len(made)
        rows.extend(made)
    return rows


def make_onpolicy_pairs(model_dir: str | Path, prompts_jsonl: str | Path, out_jsonl: str | Path, *,
                        samples_per_prompt: int = 4, temperature: float = 1.0, max_new_tokens: int = 48,
                        seed: int = 0, engine: str = "transformers", max_model_len: int = 256,
                        limit: int | None = None, pairs_per_prompt: int = 1,
                        fallback_chosen: str | None = "ground_truth_sft", sft_jsonl: str | Path | None = None,
                        score_workers: int = 2, score_timeout_s: float = 5.0, scorer=None,
                        progress: bool = True) -> dict:
    """Sample ``model_dir`` on each prompt, verify, write DPO pairs to ``out_jsonl``; return stats.

    Stats: ``prompts``, ``skipped_prompts``, ``samples``, ``verified_rate`` (all samples),
    ``per_task`` (``{task: {prompts, samples, verified_rate, pairs}}``), ``pairs``,
    ``pairs_onpolicy``, ``pairs_fallback``, the reasons prompts gave no pair, ``score_errors``,
    ``truncated`` (samples cut at ``max_new_tokens``), ``generate_s``, ``score_s``, ``seconds``,
    ``samples_per_s`` (end to end, model load included), ``generate_samples_per_s`` and ``out``.
    The same inputs and ``seed`` give the same file. ``scorer``: a running
    :class:`~tulu.rewards.RewardScorer` to use (and leave open) instead of starting one with
    ``score_workers`` and ``score_timeout_s``.
    """
    from transformers import AutoTokenizer

    from tulu.data.synthetic import write_jsonl
    from tulu.inference.engine import SamplingSettings, make_engine
    from tulu.rewards import RewardScorer

    if fallback_chosen is not None and fallback_chosen not in FALLBACK_CHOICES:
        raise ValueError(f"fallback_chosen must be None or one of {FALLBACK_CHOICES}, got {fallback_chosen!r}")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 to pair samples, got {samples_per_prompt}")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    if max_new_tokens >= max_model_len:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below max_model_len ({max_model_len})")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sft_answers = read_sft_answers(sft_jsonl) if sft_jsonl is not None and fallback_chosen else {}
    prompts, skipped = _load_prompts(Path(prompts_jsonl), tokenizer, max_model_len - max_new_tokens, limit,
                                     sft_answers)
    counts = _Counts()
    rows: list[dict] = []
    timing = {"generate_s": 0.0, "score_s": 0.0}
    bar = _Progress(len(prompts) * samples_per_prompt, progress)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        eng = make_engine(engine, model_dir, max_model_len=max_model_len, seed=seed)
        stack.callback(eng.close)
        if scorer is None:
            scorer = stack.enter_context(RewardScorer(workers=score_workers, timeout_s=score_timeout_s))
        for first in range(0, len(prompts), CHUNK_PROMPTS):
            sampling = SamplingSettings(temperature=temperature, max_new_tokens=max_new_tokens,
                                        seed=_chunk_seed(seed, first), stop_token_ids=(tokenizer.eos_token_id,))
            made = _chunk_pairs(prompts[first:first + CHUNK_PROMPTS], eng, scorer, tokenizer, sampling,
                                samples_per_prompt=samples_per_prompt, pairs_per_prompt=pairs_per_prompt,
                                fallback=fallback_chosen is not None, seed=seed, counts=counts, timing=timing)
            rows.extend(made)
            done = min(first + CHUNK_PROMPTS, len(prompts)) - first
            bar.update(done * samples_per_prompt, sum(t.verified for t in counts.per_task.values()), len(rows))
    write_jsonl(rows, out_jsonl)
    seconds = time.perf_counter() - start
    n_samples = sum(t.samples for t in counts.per_task.values())
    n_verified = sum(t.verified for t in counts.per_task.values())
    return {
        "prompts": len(prompts),
        "skipped_prompts": skipped,
        "samples": n_samples,
        "verified_rate": round(n_verified / n_samples, 6) if n_samples else 0.0,
        "per_task": {name: {"prompts": t.prompts, "samples": t.samples, "pairs": t.pairs,
                            "verified_rate": round(t.verified / t.samples, 6) if t.samples else 0.0}
                     for name, t in sorted(counts.per_task.items())},
        "pairs": len(rows),
        "pairs_onpolicy": counts.pairs_onpolicy,
        "pairs_fallback": counts.pairs_fallback,
        "prompts_all_verified": counts.prompts_all_verified,
        "prompts_none_verified": counts.prompts_none_verified,
        "no_reference": counts.no_reference,
        "fallback_reference_unverified": counts.fallback_reference_unverified,
        "score_errors": counts.score_errors,
        "truncated": counts.truncated,
        "generate_s": round(timing["generate_s"], 3),
        "score_s": round(timing["score_s"], 3),
        "seconds": round(seconds, 3),
        "samples_per_s": round(n_samples / seconds, 2) if seconds else 0.0,
        "generate_samples_per_s": round(n_samples / timing["generate_s"], 2) if timing["generate_s"] else 0.0,
        "out": str(out_jsonl),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tulu.pipeline.pairs", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="Hugging Face model folder (a `tulu export` output)")
    p.add_argument("prompts", help="jsonl in Ai2's RLVR schema (messages, ground_truth, dataset)")
    p.add_argument("out", help="output jsonl of DPO pairs")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--pairs-per-prompt", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompt rows")
    p.add_argument("--no-fallback", action="store_true",
                   help="no pair for a prompt with no verified sample (default: the SFT reference is chosen)")
    p.add_argument("--sft", default=None, help="SFT jsonl giving reference answers for the fallback")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    stats = make_onpolicy_pairs(
        a.model_dir, a.prompts, a.out, samples_per_prompt=a.samples, temperature=a.temperature,
        max_new_tokens=a.max_new_tokens, seed=a.seed, engine=a.engine, max_model_len=a.max_model_len,
        limit=a.limit, pairs_per_prompt=a.pairs_per_prompt,
        fallback_chosen=None if a.no_fallback else "ground_truth_sft", sft_jsonl=a.sft, progress=not a.no_progress)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
