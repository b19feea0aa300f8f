"""On-policy DPO pairs from a real tiny model, the real engine and the real verifiers: each pair
is a verified sample over an unverified one of the same prompt, in the rows the DPO loader reads;
the same seed writes the same file; with no verified sample the SFT reference is chosen, but only
when asked and only when the reference itself verifies. Also: held-out accuracy per task.

The "SFT model" is a 64-wide, 2-layer Llama trained here for a few seconds on sums of 0..2, so
its samples at temperature 1 are right only some of the time (what on-policy pairs need). One
reward scorer serves the module (its workers take seconds to start on 2 busy cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tulu.data.synthetic import synthetic_rows, write_jsonl
from tulu.pipeline.pairs import make_onpolicy_pairs
from tulu.rewards import RewardScorer

pytestmark = pytest.mark.multiproc

MAX_OPERAND = 2  # nine questions; a few seconds of training gets about half of the samples right
SAMPLES = 8
GEN = {"samples_per_prompt": SAMPLES, "max_new_tokens": 24, "max_model_len": 96, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin
    yield
    torch.set_num_threads(threads)


def _tiny_llama(out: Path) -> Path:
    from tulu.inference.tiny import save_tiny_llama

    # hidden 64, 2 layers, 2 heads of 32 (a head size vLLM's CPU attention takes too)
    return save_tiny_llama(out, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, init_std=0.02)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tulu.data.chat import IGNORE_INDEX, ChatFormat

    out = _tiny_llama(tmp_path_factory.mktemp("sft") / "model")
    fmt = ChatFormat(AutoTokenizer.from_pretrained(str(out)))
    chats = [fmt.tokenize(r["messages"]) for r in synthetic_rows("sft", 256, seed=0, max_operand=MAX_OPERAND)]
    width = max(len(c.input_ids) for c in chats)
    ids = torch.tensor([c.input_ids + [0] * (width - len(c.input_ids)) for c in chats])
    labels = torch.tensor([c.labels + [IGNORE_INDEX] * (width - len(c.labels)) for c in chats])
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(out))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(0, len(chats), (32,), generator=g)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    unique: dict[str, dict] = {}  # one row per question, so a pair names its prompt by its text
    for row in synthetic_rows("rlvr", 64, seed=1, max_operand=MAX_OPERAND):
        unique.setdefault(row["messages"][0]["content"], row)
    return write_jsonl(list(unique.values())[:8], tmp_path_factory.mktemp("data") / "rlvr.jsonl")


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(workers=1) as s:
        yield s


@pytest.fixture(scope="module")
def first_run(sft_model, prompts, scorer, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    stats = make_onpolicy_pairs(sft_model, prompts, out, seed=0, fallback_chosen=None, scorer=scorer, **GEN)
    return stats, out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _verified(scorer, rows: list[dict], side: str, prompt_rows: dict[str, dict]) -> list[bool]:
    results = scorer.score([{"completion": r[side][-1]["content"], "dataset": r["dataset"],
                                 "ground_truth": prompt_rows[r["prompt"]]["ground_truth"]} for r in rows])
    assert all(res.error is None for res in results)
    return [res.verified for res in results]


def test_each_pair_is_a_verified_sample_over_an_unverified_one_in_the_dpo_loader_schema(
        first_run, prompts, sft_model, scorer):
    from transformers import AutoTokenizer

    from tulu.data.preference import load_preference_dataset

    stats, out = first_run
    rows = _read(out)
    by_prompt = {r["messages"][0]["content"]: r for r in _read(prompts)}
    assert stats["prompts"] == 8 and stats["samples"] == 8 * SAMPLES
    # the model is right sometimes, not always: the case on-policy pairs are for
    assert 0 < stats["verified_rate"] < 1, stats
    assert stats["pairs"] == len(rows) == stats["pairs_onpolicy"] >= 2, stats
    assert stats["pairs_fallback"] == 0
    assert stats["pairs"] + stats["prompts_all_verified"] + stats["prompts_none_verified"] == 8
    assert len({r["prompt"] for r in rows}) == len(rows)  # pairs_per_prompt=1
    for r in rows:
        user = by_prompt[r["prompt"]]["messages"]
        assert r["chosen"][:-1] == user == r["rejected"][:-1]
        assert r["chosen"][-1]["role"] == r["rejected"][-1]["role"] == "assistant"
        assert r["dataset"] == "gsm8k" and r["pair_source"] == "onpolicy"
    assert all(_verified(scorer, rows, "chosen", by_prompt))
    assert not any(_verified(scorer, rows, "rejected", by_prompt))
    tok = AutoTokenizer.from_pretrained(str(sft_model))
    assert len(load_preference_dataset(str(out), tok, max_length=96)) == len(rows)


def test_the_same_seed_writes_the_same_pairs_and_k_pairs_per_prompt_use_distinct_samples(
        first_run, sft_model, prompts, scorer, tmp_path):
    stats, out = first_run
    again = make_onpolicy_pairs(sft_model, prompts, tmp_path / "again.jsonl", seed=0, fallback_chosen=None,
                                scorer=scorer, **GEN)
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()
    assert again["verified_rate"] == stats["verified_rate"]

    many = make_onpolicy_pairs(sft_model, prompts, tmp_path / "many.jsonl", seed=0, fallback_chosen=None,
                               pairs_per_prompt=SAMPLES, scorer=scorer, **GEN)
    rows = _read(tmp_path / "many.jsonl")
    # same samples (same seed), so the one-pair file's pairs are among these
    assert many["verified_rate"] == stats["verified_rate"] and len(rows) > stats["pairs"]
    per_prompt: dict[str, list[dict]] = {}
    for r in rows:
        per_prompt.setdefault(r["prompt"], []).append(r)
    for group in per_prompt.values():
        assert len(group) <= SAMPLES // 2  # each sample is in at most one pair
        chosen, rejected = {r["chosen"][-1]["content"] for r in group}, {r["rejected"][-1]["content"] for r in group}
        assert not chosen & rejected

    other = make_onpolicy_pairs(sft_model, prompts, tmp_path / "other.jsonl", seed=1, fallback_chosen=None,
                                scorer=scorer, **GEN)
    assert (tmp_path / "other.jsonl").read_bytes() != out.read_bytes()
    assert other["samples"] == stats["samples"]


def test_with_no_verified_sample_the_verified_sft_reference_is_chosen_only_when_asked(scorer, tmp_path):
    # An untrained model: no sample says the right sum.
    model = _tiny_llama(tmp_path / "random")
    rows = synthetic_rows("rlvr", 6, seed=2)  # sums up to 198: no chance hit by random bytes
    answers = [f"The answer is {r['ground_truth']}." for r in rows]
    rows[0]["reference"] = answers[0]
    rows[1]["reference"] = answers[1]
    rows[2]["reference"] = "The answer is 999."  # fails its verifier: no pair from it
    # rows 3 and 4 get their reference from the SFT set; row 5 has none
    sft = write_jsonl([{"messages": [*rows[i]["messages"], {"role": "assistant", "content": answers[i]}]}
                       for i in (3, 4)], tmp_path / "sft.jsonl")
    prompts = write_jsonl(rows, tmp_path / "rlvr.jsonl")
    gen = {**GEN, "samples_per_prompt": 2, "max_new_tokens": 8, "scorer": scorer}

    stats = make_onpolicy_pairs(model, prompts, tmp_path / "fb.jsonl", sft_jsonl=sft,
                                fallback_chosen="ground_truth_sft", **gen)
    assert stats["verified_rate"] == 0 and stats["prompts_none_verified"] == 6, stats
    assert stats["pairs"] == stats["pairs_fallback"] == 4
    assert stats["fallback_reference_unverified"] == 1 and stats["no_reference"] == 1
    out = _read(tmp_path / "fb.jsonl")
    assert [r["pair_source"] for r in out] == ["fallback"] * 4
    assert [r["chosen"][-1]["content"] for r in out] == [answers[i] for i in (0, 1, 3, 4)]
    by_prompt = {r["messages"][0]["content"]: r for r in rows}
    assert not any(_verified(scorer, out, "rejected", by_prompt))

    off = make_onpolicy_pairs(model, prompts, tmp_path / "off.jsonl", sft_jsonl=sft, fallback_chosen=None, **gen)
    assert off["pairs"] == 0 and (tmp_path / "off.jsonl").read_text() == ""


def test_evaluate_model_gives_accuracy_per_task_and_a_first_completion_each(sft_model, tmp_path):
    from tulu.pipeline.report import evaluate_model

    rows = synthetic_rows("rlvr", 12, seed=3, max_operand=MAX_OPERAND)
    for r in rows[8:]:
        r["dataset"] = "MATH"  # the MATH verifier (math-verify), named as in Ai2's data
    heldout = write_jsonl(rows, tmp_path / "heldout.jsonl")
    res = evaluate_model(sft_model, heldout, max_new_tokens=24, limit=11)
    assert res["n"] == 11 and set(res["per_task"]) == {"gsm8k", "math"}
    assert res["per_task"]["gsm8k"]["n"] == 8 and res["per_task"]["math"]["n"] == 3
    weighted = sum(t["n"] * t["accuracy"] for t in res["per_task"].values()) / 11
    assert res["accuracy"] == pytest.approx(weighted)
    assert set(res["examples"]) == {"gsm8k", "math"} and all(isinstance(v, str) for v in res["examples"].values())
