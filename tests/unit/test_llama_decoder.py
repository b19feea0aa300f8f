"""The fast Llama decode path gives the transformers forward's logits, and the engine's completions
with it are the ones the transformers forward gives."""

from __future__ import annotations

import pytest
import torch

from tulu.inference import SamplingSettings
from tulu.inference.hf_engine import TransformersEngine
from tulu.inference.llama_decoder import HFDecoder, LlamaDecoder, make_decoder
from tulu.inference.tiny import save_tiny_llama

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", num_hidden_layers=3)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def _run(decoder, steps, expand=None):
    ids, mask, pos = _left_padded(PROMPTS)
    out = [decoder.prefill(ids, mask, pos, steps + 1)]
    pos = pos[:, -1:]
    if expand is not None:
        decoder.expand(expand)
        out[0], pos = out[0][expand], pos[expand]
    for _ in range(steps):
        tok = out[-1].argmax(-1, keepdim=True)
        pos = pos + 1
        out.append(decoder.step(tok, pos))
    return torch.stack(out, 1)


def test_logits_match_the_transformers_forward_with_left_padding_and_expanded_rows(model):
    assert LlamaDecoder.supports(model.config)
    for expand in (None, torch.tensor([0, 0, 1, 2, 2, 2])):
        ours, ref = _run(LlamaDecoder(model), 6, expand), _run(HFDecoder(model), 6, expand)
        assert ours.shape == ref.shape and torch.isfinite(ours).all()
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    # the left-padded rows give what each prompt gives alone (the padding changes nothing)
    alone = torch.cat([_run_single(model, p) for p in PROMPTS])
    assert torch.allclose(_run(LlamaDecoder(model), 0)[:, 0], alone, atol=1e-4)


@torch.inference_mode()
def _run_single(model, prompt):
    return model(torch.tensor([prompt])).logits[:, -1]


def test_unsupported_configs_fall_back_to_the_transformers_forward(model):
    assert isinstance(make_decoder(model), LlamaDecoder)
    assert isinstance(make_decoder(model, fast=False), HFDecoder)
    cfg = model.config.__class__(**{**model.config.to_dict(), "mlp_bias": True})
    assert not LlamaDecoder.supports(cfg)
    with pytest.raises(ValueError, match="unsupported config"):
        LlamaDecoder(type("M", (), {"config": cfg})())


def test_engine_completions_are_the_transformers_forwards_and_follow_weight_updates(model_dir):
    fast = TransformersEngine(model_dir, seed=0)
    slow = TransformersEngine(model_dir, seed=0, fast_llama=False)
    assert isinstance(fast.decoder, LlamaDecoder) and isinstance(slow.decoder, HFDecoder)
    for sampling in (SamplingSettings(temperature=0, max_new_tokens=10),
                     SamplingSettings(temperature=1.0, max_new_tokens=10, seed=3)):
        a, b = fast.generate(PROMPTS, 3, sampling), slow.generate(PROMPTS, 3, sampling)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
    # new weights reach the fused matrices (refresh), not only the transformers parameters
    before = fast.generate(PROMPTS, 1, SamplingSettings(temperature=0, max_new_tokens=8))
    scaled = [(n, p.detach() * 1.7) for n, p in fast.model.named_parameters()]
    fast.update_weights(scaled)
    slow.update_weights(scaled)
    after = fast.generate(PROMPTS, 1, SamplingSettings(temperature=0, max_new_tokens=8))
    assert [c.logprobs for c in after] != [c.logprobs for c in before]
    ref = slow.generate(PROMPTS, 1, SamplingSettings(temperature=0, max_new_tokens=8))
    assert [c.token_ids for c in after] == [c.token_ids for c in ref]
    fast.close()
    slow.close()


def test_reference_logprobs_are_a_full_forward_of_each_completion_under_the_loaded_weights(model_dir, model):
    engine = TransformersEngine(model_dir, seed=0)
    with pytest.raises(RuntimeError, match="load_reference first"):
        engine.reference_logprobs(PROMPTS, [], 1.0)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert engine.load_reference(reference.items()) == len(reference)
    # the policy moves on; the reference stays
    engine.update_weights([(n, p * 1.3) for n, p in reference.items()])
    outs = engine.generate(PROMPTS, 3, SamplingSettings(temperature=1.0, max_new_tokens=7, seed=2,
                                                        stop_token_ids=[9, 10, 11]))
    assert len({len(c.token_ids) for c in outs}) > 1  # responses of several lengths (padding in the layout)
    got = engine.reference_logprobs(PROMPTS, outs, temperature=0.7)
    for c, lps in zip(outs, got):
        prompt = PROMPTS[c.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
        want = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert lps == pytest.approx(want.tolist(), abs=1e-4)
        assert lps != pytest.approx(c.logprobs, abs=1e-3)  # the policy's (scaled weights) differ
    engine.close()
