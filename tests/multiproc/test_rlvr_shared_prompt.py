"""GRPO's shared-prompt layout (`tulu.rlvr.batch.shared_prompt_micro_batches`): each prompt runs
through the real Megatron model once per group, and the loss, its metrics, the reference
log-probs and every gradient are those of the one-row-per-sample layout; with two pipeline
stages too (the sequences have their own length, which the schedule's p2p shapes follow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import grpo_passes, run_distributed  # noqa: E402
from tulu.rlvr.batch import (Rollout, build_batch, groups_by_length, micro_batches,  # noqa: E402
                             shared_prompt_flops_ratio, shared_prompt_length, shared_prompt_micro_batches)

GROUP = 4


def _rollouts(prompts: int = 4, seed: int = 0) -> list[Rollout]:
    """``prompts`` prompts of 5..11 tokens, GROUP samples each with responses of 1..7 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(prompts):
        prompt = torch.randint(3, 200, (5 + (2 * i) % 7,), generator=g).tolist()
        for j in range(GROUP):
            response = torch.randint(3, 200, (1 + (3 * i + 2 * j) % 7,), generator=g).tolist()
            lps = (-torch.rand(len(response), generator=g)).tolist()
            out.append(Rollout(i, prompt, response, lps, "stop", "ifeval", "{}"))
    return out


def _batch(rollouts):
    scores = torch.linspace(-1, 1, len(rollouts))
    return build_batch(rollouts, scores, scores, pad_id=0, multiple=1)


def test_layout_puts_each_prompt_once_and_the_responses_back_to_back():
    rollouts = _rollouts()
    batch = _batch(rollouts)
    mbs = shared_prompt_micro_batches(batch, 8, GROUP)
    W, R = max(len(r.prompt_ids) for r in rollouts), max(len(r.response_ids) for r in rollouts)
    assert len(mbs) == 2
    for m, mb in enumerate(mbs):
        mine = rollouts[m * 8:(m + 1) * 8]
        # as long as the micro-batch's longest prompt-less sequence: no response padded to R
        S = W + max(sum(len(r.response_ids) for r in mine[g * GROUP:(g + 1) * GROUP]) for g in range(2))
        assert mb["tokens"].shape == (2, S) and mb["rope_positions"].shape == (2, S)
        assert mb["targets"].shape == mb["mask"].shape == (8, R) and mb["logits_at"].shape == (2, GROUP * R)
        for row in range(8):
            r = mine[row]
            seq, j, p, n = row // GROUP, row % GROUP, len(r.prompt_ids), len(r.response_ids)
            start = W + sum(len(x.response_ids) for x in mine[seq * GROUP:row])
            tokens = mb["tokens"][seq]
            assert tokens[W - p:W].tolist() == r.prompt_ids and tokens[:W - p].eq(0).all()
            assert tokens[start:start + n].tolist() == r.response_ids
            # column t: the target is response token t, predicted at logits_at[seq, j * R + t]
            assert mb["targets"][row, :n].tolist() == r.response_ids and mb["mask"][row].sum() == n
            assert mb["sampler_logprobs"][row, :n].tolist() == pytest.approx(r.sampler_logprobs)
            at = mb["logits_at"][seq, j * R:j * R + n].tolist()
            assert at == [W - 1] + [start + t for t in range(n - 1)]
            assert mb["rope_positions"][seq, start:start + n].tolist() == list(range(W, W + n))
            # a response token sees the real prompt tokens and its own earlier tokens, nothing else
            q = start + n - 1
            seen = (~mb["attention_mask"][seq, 0, q]).nonzero().flatten().tolist()
            assert seen == list(range(W - p, W)) + list(range(start, q + 1))
        # every query sees at least one key (SDPA gives NaN for a row without any)
        assert (~mb["attention_mask"]).any(dim=-1).all()
    # pipeline parallelism: one length for every micro-batch, the batch's longest
    fixed = shared_prompt_micro_batches(batch, 8, GROUP, fixed_length=True)
    assert {mb["tokens"].shape[1] for mb in fixed} == {max(mb["tokens"].shape[1] for mb in mbs)}
    assert shared_prompt_length(batch, GROUP) == max(mb["tokens"].shape[1] for mb in mbs)


def test_groups_by_length_moves_whole_groups_shortest_first():
    rollouts = _rollouts(prompts=6, seed=3)
    batch = _batch(rollouts)
    out = groups_by_length(batch, GROUP)
    totals = [int(out.mask[g * GROUP:(g + 1) * GROUP].sum()) for g in range(6)]
    assert totals == sorted(totals)
    for g in range(6):  # each group intact: one prompt, its own rows' scores and log-probs
        rows = out.tokens[g * GROUP:(g + 1) * GROUP]
        src = [i for i in range(len(rollouts)) if torch.equal(batch.tokens[i], rows[0])][0]
        assert torch.equal(rows, batch.tokens[src:src + GROUP])
        assert torch.equal(out.scores[g * GROUP:(g + 1) * GROUP], batch.scores[src:src + GROUP])
        assert torch.equal(out.sampler_logprobs[g * GROUP:(g + 1) * GROUP], batch.sampler_logprobs[src:src + GROUP])


def test_rows_of_a_group_must_share_the_prompt():
    rollouts = _rollouts()
    rollouts[1] = Rollout(0, rollouts[1].prompt_ids[:-1] + [7], *[getattr(rollouts[1], f) for f in
                          ("response_ids", "sampler_logprobs", "finish_reason", "dataset", "ground_truth")])
    with pytest.raises(ValueError, match="does not share the prompt of rollout 0"):
        shared_prompt_micro_batches(_batch(rollouts), 8, GROUP)
    with pytest.raises(ValueError, match="whole groups"):
        shared_prompt_micro_batches(_batch(_rollouts()), 6, GROUP)


def test_flops_estimate_prefers_sharing_for_long_prompts_and_short_answers_only():
    short_answers = _batch(_rollouts())
    assert shared_prompt_flops_ratio(short_answers, GROUP, hidden=128, linear_params_per_layer=180_000) < 0.8
    g = torch.Generator().manual_seed(1)
    long_answers = [Rollout(i // GROUP, [5, 6], torch.randint(3, 200, (60,), generator=g).tolist(), [-1.0] * 60,
                            "length", "ifeval", "{}") for i in range(8)]
    assert shared_prompt_flops_ratio(_batch(long_answers), GROUP, hidden=128, linear_params_per_layer=180_000) > 1


def _config(pp: int) -> dict:
    return {
        "stage": "rlvr", "mode": "train",
        "cluster": {"executor": "local", "nodes": 1, "gpus_per_node": 1 + pp},
        "groups": {"inference": {"gpus": 1, "engine": "transformers", "max_model_len": 96},
                   "training": {"tp": 1, "pp": pp, "dp": 1, "distributed_optimizer": False, "micro_batch_size": 8}},
        "model": {"dtype": "fp32", "tiny": {"vocab_size": 264, "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 2, "num_attention_heads": 4,
                                            "num_key_value_heads": 2, "max_position_embeddings": 128}},
        "rlvr": {"algorithm": "grpo", "steps": 1, "prompts_per_step": 4, "samples_per_prompt": GROUP,
                 "response_length": 8, "kl_beta": 0.05},
        "data": {"train": "unused.jsonl", "synthetic": None},
        "run": {"name": "shared", "dir": "/nonexistent", "seed": 5},
    }


def _worker(rank, world_size):
    from megatron.core import parallel_state as ps

    from tulu.config.job import config_from_dict
    from tulu.models import megatron_cpu
    from tulu.train.rl_objectives import GRPOObjective
    from tulu.train import model as tmodel
    from tulu.train.step import reduce_sums

    megatron_cpu.apply()
    ps.initialize_model_parallel(1, world_size)
    cfg = config_from_dict(_config(world_size))
    source = tmodel.resolve_model(cfg.model, cfg.run.seed)
    policy, reference = tmodel.build_policy(cfg, source), tmodel.build_reference(cfg, source)
    batch = _batch(_rollouts())
    objective = GRPOObjective(cfg.rlvr)
    out = {}
    for layout in ("rows", "shared", "sorted"):
        mbs = (micro_batches(batch, 8, response_logits_only=True) if layout == "rows" else
               shared_prompt_micro_batches(batch, 8, GROUP, fixed_length=world_size > 1) if layout == "shared" else
               shared_prompt_micro_batches(groups_by_length(batch, GROUP), 8, GROUP, fixed_length=world_size > 1))
        stores, grads = grpo_passes(policy, reference, objective, mbs, batch.seq_length)
        last = ps.is_pipeline_last_stage()
        # reference log-probs per response token, in rollout order (last stage only)
        ref = [lp[m].tolist() for mb in mbs for lp, m in [(mb["ref_logprobs"], mb["mask"])]] if last else None
        sums = reduce_sums(stores, objective.keys)  # collective: every stage takes part
        out[layout] = {"sums": sums if last else None, "grads": grads.tolist(),
                       "ref": ref}
    ps.destroy_model_parallel()
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("pp", [1, 2])
def test_shared_prompt_passes_give_the_row_layouts_loss_reference_logprobs_and_gradients(pp):
    outs = run_distributed(_worker, pp, timeout=180)
    for out in outs:
        rows, shared = out["rows"], out["shared"]
        assert shared["grads"] == pytest.approx(rows["grads"], rel=1e-4, abs=1e-7)
        assert any(abs(x) > 1e-6 for x in rows["grads"])
        if rows["sums"] is not None:
            assert rows["sums"]["tokens"] == sum(len(r.response_ids) for r in _rollouts())
            assert shared["sums"] == pytest.approx(rows["sums"], rel=1e-5, abs=1e-6)
            assert sum(shared["ref"], []) == pytest.approx(sum(rows["ref"], []), abs=1e-5)
        # groups reordered by length: the same sums and gradients (GRPO's do not depend on order)
        assert out["sorted"]["grads"] == pytest.approx(rows["grads"], rel=1e-4, abs=1e-7)
        if rows["sums"] is not None:
            assert out["sorted"]["sums"] == pytest.approx(rows["sums"], rel=1e-5, abs=1e-6)
            assert sorted(sum(out["sorted"]["ref"], [])) == pytest.approx(sorted(sum(rows["ref"], [])), abs=1e-5)
