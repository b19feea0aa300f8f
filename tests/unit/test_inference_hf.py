"""The transformers inference engine keeps the InferenceEngine contract (it is also the oracle the
vLLM engine is checked against, so its own numbers are checked against plain forward passes)."""

from __future__ import annotations

import pytest
import torch

from tulu.inference import SamplingSettings, WeightUpdateError, make_engine
from tulu.inference.tiny import save_tiny_llama

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
GREEDY = SamplingSettings(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # 2 shared cores: more threads only spin
    eng = make_engine("transformers", model_dir)
    yield eng
    eng.close()
    torch.set_num_threads(threads)


def _forward_logprobs(model, prompt, tokens, temperature, top_p=1.0):
    """Log-probs of ``tokens`` after ``prompt`` from one full forward pass (the oracle)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    out = []
    for k, tok in enumerate(tokens):
        row = logits[len(prompt) - 1 + k] / temperature
        if top_p < 1:
            sorted_row, order = row.sort()
            drop = sorted_row.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[-1] = False
            row = torch.empty_like(row).scatter_(0, order, sorted_row.masked_fill(drop, -torch.inf))
        out.append(row.log_softmax(-1)[tok].item())
    return out


def test_greedy_output_is_deterministic_and_equals_transformers_generate(engine):
    first = engine.generate(PROMPTS, 1, GREEDY)
    again = engine.generate(PROMPTS, 1, GREEDY)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    for c in first:
        prompt = PROMPTS[c.prompt_index]
        ref = engine.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=1, pad_token_id=0)
        assert c.token_ids == ref[0, len(prompt):].tolist()
        assert c.finish_reason == "length" and len(c.logprobs) == 12
        assert isinstance(c.text, str)


def test_completions_are_ordered_by_prompt_then_sample(engine):
    outs = engine.generate(PROMPTS, 3, SamplingSettings(max_new_tokens=2, seed=1))
    assert [(c.prompt_index, c.sample_index) for c in outs] == \
        [(i, j) for i in range(len(PROMPTS)) for j in range(3)]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.8), (0.0, 1.0)])
def test_logprobs_equal_a_separate_forward_pass_at_the_sampling_temperature(engine, temperature,
                                                                             top_p):
    outs = engine.generate(PROMPTS, 2, SamplingSettings(temperature=temperature, top_p=top_p,
                                                        max_new_tokens=10, seed=3))
    for c in outs:
        ref = _forward_logprobs(engine.model, PROMPTS[c.prompt_index], c.token_ids,
                                temperature or 1.0, top_p)
        assert c.logprobs == pytest.approx(ref, abs=1e-4)


def test_same_seed_gives_same_samples_whatever_the_batch_size(model_dir, engine):
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=8, seed=11)
    batched = engine.generate(PROMPTS, 2, sampling)
    engine.max_batch_size = 1
    try:
        one_by_one = engine.generate(PROMPTS, 2, sampling)
    finally:
        engine.max_batch_size = 64
    other_seed = engine.generate(PROMPTS, 2, SamplingSettings(temperature=1.0, max_new_tokens=8,
                                                              seed=12))
    assert [c.token_ids for c in batched] == [c.token_ids for c in one_by_one]
    assert [c.token_ids for c in batched] != [c.token_ids for c in other_seed]
    # The two samples of one prompt differ (each row has its own noise).
    assert batched[0].token_ids != batched[1].token_ids


def test_a_stop_token_ends_the_completion_and_is_kept(engine):
    greedy = engine.generate(PROMPTS[:1], 1, GREEDY)[0].token_ids
    stop = greedy[3]
    first = greedy.index(stop)
    out = engine.generate(PROMPTS[:1], 1, SamplingSettings(temperature=0, max_new_tokens=12,
                                                           stop_token_ids=(stop,)))[0]
    assert out.token_ids == greedy[:first + 1]
    assert out.finish_reason == "stop" and len(out.logprobs) == first + 1


def test_update_weights_changes_the_output_and_matches_a_fresh_load(model_dir, tmp_path, engine):
    before = engine.generate(PROMPTS, 1, GREEDY)
    old = {k: v.clone() for k, v in engine.model.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in old.items()}
    try:
        assert engine.update_weights(iter(new.items())) == len(new)
        after = engine.generate(PROMPTS, 1, GREEDY)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        # Oracle: a model saved with the new weights and loaded from disk says the same.
        engine.model.save_pretrained(str(tmp_path / "new"))
        fresh = make_engine("transformers", tmp_path / "new", load_tokenizer=False)
        assert [c.token_ids for c in fresh.generate(PROMPTS, 1, GREEDY)] == \
            [c.token_ids for c in after]
    finally:
        engine.update_weights(old.items())
    assert [c.token_ids for c in engine.generate(PROMPTS, 1, GREEDY)] == \
        [c.token_ids for c in before]


@pytest.mark.parametrize("mutate,message", [
    (lambda w: [("model.layers.0.mlp.gate.weight", t) if n == "model.layers.0.mlp.gate_proj.weight"
                else (n, t) for n, t in w], "unknown parameter 'model.layers.0.mlp.gate.weight'"),
    (lambda w: [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in w],
     "'model.norm.weight' with shape (127,), but the model's is (128,)"),
    (lambda w: [(n, t) for n, t in w if n != "lm_head.weight"], "not 'lm_head.weight'"),
    (lambda w: w + w[:1], "twice"),
])
def test_update_weights_rejects_a_bad_stream_naming_the_tensor_and_keeps_old_weights(
        engine, mutate, message):
    before = [c.token_ids for c in engine.generate(PROMPTS, 1, GREEDY)]
    weights = [(n, torch.zeros_like(t)) for n, t in engine.model.state_dict().items()]
    with pytest.raises(WeightUpdateError, match="transformers engine") as err:
        engine.update_weights(mutate(weights))
    assert message in str(err.value)
    assert [c.token_ids for c in engine.generate(PROMPTS, 1, GREEDY)] == before


def test_make_engine_names_the_valid_kinds(model_dir):
    with pytest.raises(ValueError, match="'vllm', 'transformers'|vllm, transformers"):
        make_engine("sglang", model_dir)
    with pytest.raises(ValueError, match="tp=2"):
        make_engine("transformers", model_dir, tp=2)


def test_sampling_settings_reject_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)
    assert SamplingSettings(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)


def test_seeded_sampler_draws_each_token_with_its_probability_and_never_a_masked_one():
    from tulu.inference.hf_engine import row_uniforms, sample_step

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    rows = [(i, 0) for i in range(20000)]
    logits = probs.log().expand(len(rows), -1)
    u = torch.tensor(row_uniforms(7, rows, 0), dtype=torch.float64)
    tokens, lps = sample_step(logits, SamplingSettings(temperature=1.0), u)
    freq = torch.bincount(tokens, minlength=5).double() / len(rows)
    assert freq.tolist() == pytest.approx(probs.tolist(), abs=0.012)  # 3.5 sigma at p = 0.5
    assert lps.tolist() == pytest.approx(probs.log()[tokens].tolist(), abs=1e-6)
    # top-p 0.7 keeps {0.5, 0.3}: the others are never drawn, and log-probs are renormalised
    tokens, lps = sample_step(logits, SamplingSettings(temperature=1.0, top_p=0.7), u)
    assert set(tokens.tolist()) == {0, 2}
    assert torch.exp(lps[tokens == 0][0]).item() == pytest.approx(0.5 / 0.8, abs=1e-6)
