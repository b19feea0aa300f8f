"""Uneven pipeline stages, as the 405B presets use them (126 layers over PP10: 11, 13 x 8, 11):
Megatron builds the split that ``tulu.plan.layout.layers_per_stage`` plans, and the uneven model is
the PP1 model: the same logits, loss and gradients through the pipeline schedule, the HF name
mapping and the per-stage weight stream (weight sync's source) name every layer by its global
index, and its checkpoint loads at PP1 tensor for tensor.

Miniatures: 5 layers over PP2 (2 + 3) and 8 layers over PP3 (3, 2, 3). One run per layout
computes everything (module fixture): the PP run, then, in the same processes, PP1.
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
VOCAB, SEQ, MICRO_BATCHES, MICRO_BATCH = 64, 16, 2, 2
LAYOUTS = {"5_layers_pp2": (5, 2), "8_layers_pp3": (8, 3)}


def _hf_weights(num_layers: int):
    from tulu.models.llama import tiny_llama_config
    from tulu.train.model import SeededInit

    cfg = tiny_llama_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=8,
                            num_hidden_layers=num_layers)
    init = SeededInit(cfg, seed=3)
    sd = {k: init[k] for k in init}
    g = torch.Generator().manual_seed(5)
    for k in sd:  # norms start at 1: make them matter
        if "norm" in k:
            sd[k] = sd[k] + 0.2 * torch.randn(sd[k].shape, generator=g)
    return cfg, sd


def _run_schedule(model, batches, num_micro):
    """Forward + backward through Megatron's schedule; the last stage's logits and mean loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    logits_seen = []

    def loss_func(labels, output):
        logits_seen.append(output.detach().clone())
        loss = torch.nn.functional.cross_entropy(output.reshape(-1, VOCAB), labels.reshape(-1))
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        return model(ids, torch.arange(SEQ).expand_as(ids), None), lambda out: loss_func(labels, out)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False)
    loss = sum(x["loss"].item() for x in losses) / num_micro if losses else None
    return logits_seen, loss


def _hf_grads(model, cfg) -> dict[str, torch.Tensor]:
    """This stage's gradients under HF names (the weight-export path, applied to .grad)."""
    from tulu.models.convert import iter_hf_weights

    for p in model.parameters():
        p.data = p.grad
    return dict(iter_hf_weights(model, cfg))


def _uneven_worker(rank, world_size, num_layers, root):
    import multiprocessing as mp

    mp.current_process()._config["daemon"] = False  # Megatron's checkpoint writer forks
    from megatron.core import parallel_state as ps

    from tulu.checkpoint import sharded
    from tulu.models.convert import hf_state_dict_to_megatron, iter_hf_weights, megatron_to_hf_state_dict
    from tulu.models.llama import build_gpt_model
    from tulu.plan.layout import layers_per_stage

    cfg, hf_sd = _hf_weights(num_layers)
    torch.manual_seed(1)
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1)) for _ in range(MICRO_BATCHES)]

    ps.initialize_model_parallel(pipeline_model_parallel_size=world_size)
    stage = ps.get_pipeline_model_parallel_rank()
    model = build_gpt_model(cfg)
    hf_state_dict_to_megatron(hf_sd, cfg, model)
    out: dict = {"stage": stage, "plan": layers_per_stage(num_layers, world_size),
                 "layers": [layer.layer_number for layer in model.decoder.layers],
                 "stage_names": [name for name, _ in iter_hf_weights(model, cfg)]}
    back = megatron_to_hf_state_dict(model, cfg)
    out["round_trip_differs"] = sorted(set(hf_sd) ^ set(back)) + sorted(
        k for k in set(hf_sd) & set(back) if not torch.equal(hf_sd[k], back[k]))
    (Path(root) / "model").mkdir(exist_ok=True)
    sharded.save_model(model, Path(root) / "model")
    logits, out["loss"] = _run_schedule(model, batches, MICRO_BATCHES)
    grads = _hf_grads(model, cfg)
    ps.destroy_model_parallel()

    # The same weights at PP1 (every rank computes it: DP = world size).
    ps.initialize_model_parallel()
    ref = build_gpt_model(cfg)
    hf_state_dict_to_megatron(hf_sd, cfg, ref)
    from_ckpt = build_gpt_model(cfg)
    sharded.load_model(from_ckpt, Path(root) / "model")
    ref_sd, ckpt_sd = ref.state_dict(), from_ckpt.state_dict()
    out["checkpoint_differs"] = sorted(k for k in ref_sd if isinstance(ref_sd[k], torch.Tensor)
                                       and not torch.equal(ref_sd[k], ckpt_sd[k]))
    ref_logits, out["pp1_loss"] = _run_schedule(ref, batches, MICRO_BATCHES)
    ref_grads = _hf_grads(ref, cfg)
    out["logits_diff"] = max(((a - b).abs().max().item() for a, b in zip(logits, ref_logits)), default=None)
    out["grad_diff"] = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def uneven(request, tmp_path_factory):
    num_layers, pp = LAYOUTS[request.param]
    return num_layers, pp, run_distributed(_uneven_worker, pp, num_layers, str(tmp_path_factory.mktemp("ckpt")),
                                           timeout=180)


def test_megatron_builds_the_plans_uneven_split_with_global_layer_numbers(uneven):
    num_layers, pp, ranks = uneven
    plan = ranks[0]["plan"]
    assert len(set(plan)) > 1, f"{plan}: the miniature must keep the preset's uneven stages"
    first = 1
    for r in ranks:
        count = plan[r["stage"]]
        assert r["layers"] == list(range(first, first + count)), (r["stage"], r["layers"], plan)
        first += count
    assert first == num_layers + 1


def test_uneven_stages_stream_every_hf_tensor_once_under_its_global_name(uneven):
    num_layers, _, ranks = uneven
    names = [n for r in ranks for n in r["stage_names"]]
    assert len(names) == len(set(names)) == 3 + 9 * num_layers
    for r in ranks:
        held = {int(n.split(".")[2]) for n in r["stage_names"] if n.startswith("model.layers.")}
        assert sorted(held) == [n - 1 for n in r["layers"]], (r["stage"], held)
        assert r["round_trip_differs"] == [], r["round_trip_differs"]


def test_uneven_pipeline_gives_the_pp1_logits_loss_and_gradients(uneven):
    _, pp, ranks = uneven
    last = ranks[pp - 1]
    assert last["logits_diff"] is not None and last["logits_diff"] <= ATOL, last["logits_diff"]
    assert last["loss"] == pytest.approx(last["pp1_loss"], abs=ATOL)
    for r in ranks:
        assert r["grad_diff"] <= ATOL, (r["stage"], r["grad_diff"])


def test_uneven_pipeline_checkpoint_loads_at_pp1_tensor_for_tensor(uneven):
    for r in uneven[2]:
        assert r["checkpoint_differs"] == [], r["checkpoint_differs"]
