"""Sequence parallelism, as the 405B and 8B RLVR presets use it, runs on CPU with the same
Megatron settings as on a GPU and changes nothing but where activations live: TP2 + SP trains
with the losses and gradients of TP2 without it, and PPO's value model (a replicated scalar
head that gathers the sequence) gives the same values and gradients. The norms' weight gradients are the part
that needs care (each TP rank sees only its slice of the sequence): they are marked
``sequence_parallel`` and summed over TP by Megatron's ``finalize_model_grads``.

One 2-process run builds every model from the same weights (module fixture).
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

RTOL, ATOL = 1e-5, 1e-6  # TP/SP change the order of float sums: fp32 rounding only
VOCAB, SEQ, MICRO_BATCHES, MICRO_BATCH, STEPS = 64, 16, 2, 2, 3


def _train(sequence_parallel: bool, hf_sd, cfg, batches):
    """STEPS Adam steps at TP2 through Megatron's DDP and schedule: (losses, first-step grads
    by parameter name, names of the parameters marked sequence_parallel)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tulu.models.convert import hf_state_dict_to_megatron
    from tulu.models.llama import build_gpt_model

    model = build_gpt_model(cfg, sequence_parallel=sequence_parallel, calculate_per_token_loss=True)
    hf_state_dict_to_megatron(hf_sd, cfg, model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), [ddp])

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        per_token = model(ids, torch.arange(SEQ).expand_as(ids), None, labels=labels)

        def loss_func(output):
            n = torch.tensor(output.numel(), dtype=torch.int)
            return output.sum(), n, {"loss": torch.stack([output.sum().detach(), n.float()])}

        return per_token, loss_func

    losses, grads = [], None
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        stores = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
            num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
        if grads is None:
            grads = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}
        ok, _, _ = opt.step()
        assert ok
        total = sum(s["loss"] for s in stores)
        losses.append((total[0] / total[1]).item())
    marked = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    return losses, grads, marked


def _value_model(sequence_parallel: bool, hf_sd, cfg, batches):
    """PPO's value model (GPT + replicated scalar head) at TP2: one forward/backward of a squared
    error through Megatron's DDP and schedule; (values, gradients by parameter name)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tulu.models.convert import hf_state_dict_to_megatron
    from tulu.models.llama import build_gpt_model
    from tulu.rlvr.value import attach_value_head

    model = build_gpt_model(cfg, sequence_parallel=sequence_parallel)
    hf_state_dict_to_megatron(hf_sd, cfg, model)
    attach_value_head(model, cfg, seed=11)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    values = []

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)[:, :-1]
        out = model(tokens, torch.arange(SEQ).expand_as(tokens), None)
        target = (tokens.float() / VOCAB).unsqueeze(-1)

        def loss_func(v):
            values.append(v.detach().clone())
            return ((v - target) ** 2).mean(), {}

        return out, loss_func

    ddp.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
                                num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    return torch.cat(values), {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}


def _sp_worker(rank, world_size):
    from megatron.core import parallel_state as ps

    from tulu.models.llama import tiny_llama_config
    from tulu.train.model import SeededInit

    cfg = tiny_llama_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=8,
                            num_hidden_layers=2)
    init = SeededInit(cfg, seed=3)
    g = torch.Generator().manual_seed(5)
    hf_sd = {k: init[k] + (0.2 * torch.randn(init[k].shape, generator=g) if "norm" in k else 0) for k in init}
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g) for _ in range(MICRO_BATCHES)]
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    plain = _train(False, hf_sd, cfg, batches)
    sp = _train(True, hf_sd, cfg, batches)
    plain_values, plain_value_grads = _value_model(False, hf_sd, cfg, batches)
    sp_values, sp_value_grads = _value_model(True, hf_sd, cfg, batches)
    ps.destroy_model_parallel()
    return {"plain_losses": plain[0], "sp_losses": sp[0], "plain_marked": plain[2], "sp_marked": sp[2],
            "grad_diff": _diffs(sp[1], plain[1]), "grad_scale": _scale(plain[1]),
            "value_diff": (sp_values - plain_values).abs().max().item(),
            "value_grad_diff": _diffs(sp_value_grads, plain_value_grads),
            "value_grad_scale": _scale(plain_value_grads)}


def _diffs(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {n: (a[n] - b[n]).abs().max().item() for n in b}


def _scale(grads: dict) -> float:
    return max(t.abs().max().item() for t in grads.values())


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_sp_worker, 2, timeout=180)


def test_sequence_parallel_marks_every_norm_weight_for_the_tp_all_reduce(ranks):
    for r in ranks:
        assert r["plain_marked"] == []
        assert r["sp_marked"] == ["decoder.final_layernorm.weight"] + [
            f"decoder.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "pre_mlp_layernorm")]


def test_tp2_with_sequence_parallel_trains_with_the_losses_of_tp2_without(ranks):
    for r in ranks:
        assert r["sp_losses"] == pytest.approx(r["plain_losses"], rel=RTOL), r
        assert r["sp_losses"][-1] < r["sp_losses"][0]  # it trains


def test_tp2_with_sequence_parallel_gives_the_gradients_of_tp2_without(ranks):
    for r in ranks:
        worst = max(r["grad_diff"], key=r["grad_diff"].get)
        assert r["grad_diff"][worst] <= ATOL + RTOL * r["grad_scale"], (worst, r["grad_diff"][worst])


def test_ppo_value_model_with_sequence_parallel_gives_the_values_and_gradients_without(ranks):
    for r in ranks:
        assert r["value_diff"] <= ATOL, r["value_diff"]
        worst = max(r["value_grad_diff"], key=r["value_grad_diff"].get)
        assert r["value_grad_diff"][worst] <= ATOL + RTOL * r["value_grad_scale"], (worst, r["value_grad_diff"][worst])
