"""The Megatron Llama computes what transformers' LlamaForCausalLM computes, at TP=1 and TP=2,
with and without Llama 3.1 rope scaling; TP does not change the logits; the SDPA core attention
matches Megatron's own unfused attention, forward and backward.

One 2-process gloo run computes everything (module fixture); each test asserts one promise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import run_distributed  # noqa: E402

pytestmark = pytest.mark.multiproc

ATOL = 1e-5
VOCAB = 255  # odd: TP=2 pads the embedding to 256 rows
SEQ = 48     # > the tiny rope-scaling config's original context (32): scaling matters


def _hf_model(rope_scaling: bool):
    from transformers import LlamaForCausalLM

    from tulu.models.llama import tiny_llama_config

    cfg = tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=2, rope_scaling=rope_scaling)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; make them matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return cfg, hf


def _megatron(cfg, hf, tp: int, attention: str = "sdpa"):
    from megatron.core import parallel_state as ps

    from tulu.models.convert import hf_state_dict_to_megatron
    from tulu.models.llama import build_gpt_model

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model = build_gpt_model(cfg, attention=attention)
    hf_state_dict_to_megatron(hf.state_dict(), cfg, model)
    return model


def _full_logits(model, ids):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return gather_from_tensor_model_parallel_region(model(ids, pos, None))[..., :VOCAB]


def _compare_worker(rank, world_size):
    from megatron.core import parallel_state as ps

    out: dict = {}
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    for rope in (False, True):
        cfg, hf = _hf_model(rope)
        with torch.no_grad():
            ref = hf(ids).logits
        logits = {}
        for tp in (1, 2):
            model = _megatron(cfg, hf, tp).eval()
            with torch.no_grad():
                logits[tp] = _full_logits(model, ids)
            out[("vs_hf", tp, rope)] = (logits[tp] - ref).abs().max().item()
        out[("tp1_vs_tp2", rope)] = (logits[1] - logits[2]).abs().max().item()
        out[("ref_scale", rope)] = ref.abs().max().item()
        if rope:
            _, hf_plain = _hf_model(False)
            with torch.no_grad():
                out["rope_scaling_effect"] = (hf_plain(ids).logits - ref).abs().max().item()

    # SDPA vs Megatron's unfused attention at TP=2, forward and backward on the same weights.
    cfg, hf = _hf_model(True)
    grads, fwd = {}, {}
    for attention in ("sdpa", "unfused"):
        model = _megatron(cfg, hf, 2, attention)
        logits = _full_logits(model, ids)
        logits.float().pow(2).mean().backward()
        fwd[attention] = logits.detach()
        grads[attention] = {n: p.grad.clone() for n, p in model.named_parameters()}
    out["sdpa_vs_unfused_logits"] = (fwd["sdpa"] - fwd["unfused"]).abs().max().item()
    out["sdpa_vs_unfused_grads"] = max(
        (grads["sdpa"][n] - grads["unfused"][n]).abs().max().item() for n in grads["sdpa"]
    )
    out["grad_count"] = len(grads["sdpa"])
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def diffs():
    results = run_distributed(_compare_worker, 2, timeout=300)
    # Both ranks gathered the same full logits; gradients are per-shard, so take the worst.
    return {k: max(r[k] for r in results) for k in results[0]}


@pytest.mark.parametrize("rope_scaling", [False, True], ids=["plain_rope", "llama31_rope"])
def test_megatron_logits_match_transformers_at_tp1(diffs, rope_scaling):
    assert diffs[("vs_hf", 1, rope_scaling)] <= ATOL, diffs


@pytest.mark.parametrize("rope_scaling", [False, True], ids=["plain_rope", "llama31_rope"])
def test_megatron_logits_match_transformers_at_tp2(diffs, rope_scaling):
    assert diffs[("vs_hf", 2, rope_scaling)] <= ATOL, diffs


def test_llama31_rope_scaling_changes_the_logits_the_tests_compare(diffs):
    # Guards the test itself: with a 32-token original context and 48 tokens, scaling matters.
    assert diffs["rope_scaling_effect"] > 100 * ATOL, diffs


@pytest.mark.parametrize("rope_scaling", [False, True], ids=["plain_rope", "llama31_rope"])
def test_tensor_parallelism_does_not_change_the_logits(diffs, rope_scaling):
    assert diffs[("tp1_vs_tp2", rope_scaling)] <= ATOL, diffs


def test_sdpa_attention_matches_megatron_unfused_attention_forward_and_backward(diffs):
    assert diffs["grad_count"] > 0
    assert diffs["sdpa_vs_unfused_logits"] <= ATOL, diffs
    assert diffs["sdpa_vs_unfused_grads"] <= ATOL, diffs
