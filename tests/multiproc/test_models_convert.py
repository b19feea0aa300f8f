"""HF <-> Megatron weight conversion at TP=2 x PP=2 (4 gloo processes): the round trip is exact,
each stage streams its own tensors, and the converted model run through Megatron's pipeline
schedule gives transformers' logits, loss and gradients.

One 4-process run computes everything (module fixture); each test asserts one promise.
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
VOCAB = 255  # odd: TP=2 pads the vocabulary to 256 rows, the export must drop the padding
SEQ, MICRO_BATCHES, MICRO_BATCH = 40, 2, 2


def _hf_model():
    from transformers import LlamaForCausalLM

    from tulu.models.llama import tiny_llama_config

    cfg = tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=4, rope_scaling=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF initialises norms to 1; make them matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return cfg, hf


def _tp2_pp2_worker(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from tulu.models.convert import (
        hf_state_dict_to_megatron,
        iter_hf_weights,
        megatron_to_hf_state_dict,
    )
    from tulu.models.llama import build_gpt_model

    cfg, hf = _hf_model()
    hf_sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    model = build_gpt_model(cfg)
    hf_state_dict_to_megatron(hf_sd, cfg, model)
    out: dict = {"hf_names": sorted(hf_sd), "stage": ps.get_pipeline_model_parallel_rank(),
                 "tp_rank": ps.get_tensor_model_parallel_rank(),
                 "layers": [layer.layer_number for layer in model.decoder.layers]}

    # 1. Round trip and the per-stage stream.
    out["stage_names"] = [name for name, _ in iter_hf_weights(model, cfg)]
    back = megatron_to_hf_state_dict(model, cfg)
    out["missing"] = sorted(set(hf_sd) - set(back))
    out["extra"] = sorted(set(back) - set(hf_sd))
    common = set(hf_sd) & set(back)
    out["not_equal"] = sorted(k for k in common if not torch.equal(hf_sd[k], back[k]))

    # 2. Forward and backward through the 1F1B pipeline schedule vs transformers.
    torch.manual_seed(1)
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1)) for _ in range(MICRO_BATCHES)]
    logits_seen = []

    def loss_func(labels, output):
        logits = gather_from_tensor_model_parallel_region(output)[..., :VOCAB]
        logits_seen.append(logits.detach())
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        pos = torch.arange(SEQ).expand_as(ids)
        return model(ids, pos, None), lambda output: loss_func(labels, output)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    hf_loss = 0.0
    for tokens in batches:
        ref = hf(tokens[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(ref.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        (ce / MICRO_BATCHES).backward()
        hf_loss += ce.item() / MICRO_BATCHES
        if logits_seen:  # last stage: compare this micro-batch's logits
            got = logits_seen.pop(0)
            out["logits_diff"] = max(out.get("logits_diff", 0.0), (got - ref).abs().max().item())
    if losses:
        out["loss"] = sum(x["loss"].item() for x in losses) / MICRO_BATCHES
        out["hf_loss"] = hf_loss
    # Gradients: export the Megatron grads the same way as weights, compare to HF's grads.
    for p in model.parameters():
        p.data = p.grad
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    grads = dict(iter_hf_weights(model, cfg))
    out["grad_names"] = sorted(grads)
    out["grad_diff"] = max((grads[k] - hf_grads[k]).abs().max().item() for k in grads)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_tp2_pp2_worker, 4, timeout=300)


def test_layers_are_split_over_two_pipeline_stages(ranks):
    by_stage = {r["stage"]: r["layers"] for r in ranks}
    assert by_stage == {0: [1, 2], 1: [3, 4]}


def test_hf_to_megatron_tp2_pp2_to_hf_round_trip_reproduces_every_tensor_exactly(ranks):
    for r in ranks:
        assert r["missing"] == [] and r["extra"] == [], r
        assert r["not_equal"] == [], f"rank {r}: tensors changed in the round trip"


def test_iter_hf_weights_streams_each_tensor_from_exactly_one_stage(ranks):
    stage_names = {r["stage"]: r["stage_names"] for r in ranks}
    assert stage_names[0][0] == "model.embed_tokens.weight"
    assert stage_names[1][-2:] == ["model.norm.weight", "lm_head.weight"]
    assert not set(stage_names[0]) & set(stage_names[1])
    assert sorted(stage_names[0] + stage_names[1]) == ranks[0]["hf_names"]
    for r in ranks:  # TP ranks of a stage stream the same names in the same order
        assert r["stage_names"] == stage_names[r["stage"]]


def test_pipeline_schedule_logits_and_loss_match_transformers_at_tp2_pp2(ranks):
    last = [r for r in ranks if r["stage"] == 1]
    assert len(last) == 2
    for r in last:
        assert r["logits_diff"] <= ATOL, r["logits_diff"]
        assert r["loss"] == pytest.approx(r["hf_loss"], abs=ATOL)


def test_pipeline_schedule_gradients_match_transformers_at_tp2_pp2(ranks):
    for r in ranks:
        assert r["grad_diff"] <= ATOL, (r["stage"], r["tp_rank"], r["grad_diff"])
