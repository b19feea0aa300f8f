"""RLVR with rollouts generated one step ahead (``rlvr.async_steps: 1``), through the same
`tulu.modes.train.run(ctx)` a Slurm task calls: a transformers-engine inference rank and a
Megatron training rank on real gloo groups, weights synced over the bridge.

The promises: the engine generates step s's rollouts with the weights after step s - 1 (step 0
and 1 with the initial weights), each version sent once, and the metrics say which version made
each step's rollouts; a run stopped after a checkpoint and resumed repeats the uninterrupted run
exactly (the rollout in flight at the checkpoint is saved with it), and the first rollouts the
resumed engine generates come from the checkpoint's weights; a checkpoint without rollouts in
flight (a synchronous run's) is resumed by generating with the checkpoint's weights; the first
step of an async run is the synchronous run's first step.

Rewards vary from the first step (IFEval's "all lowercase" on a random model's bytes holds for
about half the completions), so the policy moves every step and one step of lag is visible:
`sampler_kl` (engine log-probs - trainer log-probs under the weights being trained, a k1 estimate:
either sign on 48 tokens) is ~0 when the rollouts are on-policy and clearly not when they are one
step old; `approx_kl` (k3 on the PPO ratio against the behaviour log-probs, >= 0) likewise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import grpo_passes, job_task, random_job_id, run_distributed  # noqa: E402

pytestmark = pytest.mark.multiproc

STEPS = 6
STOP_AFTER = 3
TIMING = ("_s", "_per_s")  # metric names ending so are wall-clock times, not results


def _prompts(path: Path) -> str:
    rows = [{"messages": [{"role": "user", "content": f"Write note {i} in lowercase."}],
             "ground_truth": json.dumps({"func_name": "validate_lowercase"}), "dataset": "ifeval"}
            for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(run_dir: Path, train_file: str, async_steps: int) -> dict:
    return {
        "stage": "rlvr", "mode": "train",
        "cluster": {"executor": "local", "nodes": 1, "gpus_per_node": 2},
        "groups": {"inference": {"gpus": 1, "engine": "transformers", "max_model_len": 96},
                   "training": {"tp": 1, "pp": 1, "dp": 1, "distributed_optimizer": False, "micro_batch_size": 8}},
        "model": {"dtype": "fp32", "tiny": {"vocab_size": 264, "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 2, "num_attention_heads": 4,
                                            "num_key_value_heads": 2, "max_position_embeddings": 128}},
        "rlvr": {"algorithm": "grpo", "optim": {"lr": 3.0e-3, "lr_schedule": "constant", "warmup_ratio": 0.0},
                 "steps": STEPS, "prompts_per_step": 2, "samples_per_prompt": 4, "response_length": 6,
                 "kl_beta": 0.05, "verified_reward": 1.0, "verifier_workers": 1, "async_steps": async_steps},
        "data": {"train": train_file, "synthetic": None},
        "checkpoint": {"interval": 100, "keep_last": 2},
        "monitoring": {"enabled": False},
        "run": {"name": "async", "dir": str(run_dir), "seed": 5},
    }


def _job(cfg: dict, stop_after_steps: int | None = None) -> dict:
    """Runs the 2-task job; returns the inference rank's result (its rollout versions)."""
    inference, _ = run_distributed(job_task, 2, cfg, random_job_id(), stop_after_steps, init_process_group=False,
                                   timeout=400)
    return inference


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "train"]


def _results(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith(TIMING)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return _prompts(tmp_path_factory.mktemp("data") / "lowercase.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prompts):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    inference = _job(_config(run_dir, prompts, async_steps=1))
    return run_dir, inference


def test_engine_generates_each_step_with_the_previous_steps_weights(uninterrupted):
    run_dir, inference = uninterrupted
    # (step, weights version): W_0 makes R_0 and R_1, then R_s comes from W_{s-1}
    assert inference["rollout_versions"] == [[0, 0], [1, 0], [2, 1], [3, 2], [4, 3], [5, 4]]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["rollout_policy_version"] for r in rows] == [0, 0, 1, 2, 3, 4]
    # a version is sent once: the step that reuses W_0 receives nothing
    assert [r.get("weight_sync_bytes", 0) > 0 for r in rows] == [True, True, True, True, True, False]
    # at TP 1 the weights go from a thread the optimizer step waits for; the engine still got exactly
    # the weights of the step's start (sampler_kl below)
    assert ["weight_sync_wait_s" in r for r in rows] == [True, True, True, True, True, False]
    # the rewards vary, so the policy moves every step: one step of lag shows in sampler_kl
    assert all(0 < r["reward_mean"] < 1 for r in rows[:3]), [r["reward_mean"] for r in rows]
    assert abs(rows[0]["sampler_kl"]) < 1e-5  # on-policy: the engine held exactly W_0
    for r in rows[1:]:  # the rollouts are a step old: W_{s-1} != W_s
        assert abs(r["sampler_kl"]) > 1e-5 and r["approx_kl"] > 1e-5, r


def test_stopped_and_resumed_async_run_repeats_the_uninterrupted_run_exactly(uninterrupted, prompts, tmp_path):
    run_dir, _ = uninterrupted
    cfg = _config(tmp_path, prompts, async_steps=1)
    first = _job(cfg, stop_after_steps=STOP_AFTER)
    # the engine had made R_3 (with W_2) when the learner stopped at step 3: the checkpoint holds it
    assert first["rollout_versions"] == [[0, 0], [1, 0], [2, 1], [3, 2]]
    assert (tmp_path / "checkpoints" / f"step_{STOP_AFTER}" / "manifest.json").exists()
    second = _job(cfg)
    # the resumed engine's first rollouts (R_4) come from the checkpoint's weights W_3
    assert second["rollout_versions"] == [[4, 3], [5, 4]]
    got, expected = _rows(tmp_path), _rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [_results(r) for r in got] == [_results(r) for r in expected]


def test_first_async_step_is_the_synchronous_runs_first_step_and_sync_stays_on_policy(uninterrupted, prompts,
                                                                                       tmp_path):
    run_dir, _ = uninterrupted
    inference = _job(_config(tmp_path, prompts, async_steps=0), stop_after_steps=STOP_AFTER)
    assert inference["rollout_versions"] == [[s, s] for s in range(STOP_AFTER)]
    sync = _rows(tmp_path)
    assert _results(sync[0]) == _results(_rows(run_dir)[0])
    for r in sync:
        assert abs(r["sampler_kl"]) < 1e-5 and r["approx_kl"] == 0.0 and r["clip_frac"] == 0.0, r
        assert r["rollout_policy_version"] == r["step"] - 1


def test_async_resume_from_a_checkpoint_without_rollouts_generates_with_its_weights(prompts, tmp_path):
    _job(_config(tmp_path, prompts, async_steps=0), stop_after_steps=STOP_AFTER)  # sync: nothing in flight
    cfg = _config(tmp_path, prompts, async_steps=1)
    cfg["rlvr"]["steps"] = STOP_AFTER + 2
    inference = _job(cfg)
    assert inference["rollout_versions"] == [[STOP_AFTER, STOP_AFTER], [STOP_AFTER + 1, STOP_AFTER]]
    rows = _rows(tmp_path)
    assert [r["rollout_policy_version"] for r in rows] == [0, 1, 2, 3, 3]
    resumed = rows[STOP_AFTER]
    assert abs(resumed["sampler_kl"]) < 1e-5, resumed  # generated with exactly the checkpoint's weights
    assert resumed["approx_kl"] == 0.0
    assert abs(rows[-1]["sampler_kl"]) > 1e-5 and rows[-1]["approx_kl"] > 1e-5


def _response_logits_worker(rank, world_size):
    import torch
    from megatron.core import parallel_state as ps

    from tulu.config.job import config_from_dict
    from tulu.models import megatron_cpu
    from tulu.rlvr.batch import Rollout, build_batch, micro_batches
    from tulu.train.rl_objectives import GRPOObjective
    from tulu.train import model as tmodel
    from tulu.train.step import reduce_sums

    megatron_cpu.apply()
    ps.initialize_model_parallel(1, 1)
    cfg = config_from_dict(_config(Path("/nonexistent"), "unused.jsonl", async_steps=0))
    source = tmodel.resolve_model(cfg.model, cfg.run.seed)
    policy, reference = tmodel.build_policy(cfg, source), tmodel.build_reference(cfg, source)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(16):  # prompts of 6..10 tokens, responses of 1..7
        prompt = torch.randint(3, 200, (6 + i % 5,), generator=g).tolist()
        response = torch.randint(3, 200, (1 + (3 * i) % 7,), generator=g).tolist()
        rollouts.append(Rollout(i, prompt, response, [-5.0] * len(response), "stop", "ifeval", "{}"))
    scores = torch.randn(16, generator=g)
    batch = build_batch(rollouts, scores, scores, pad_id=0, multiple=1)
    objective = GRPOObjective(cfg.rlvr)
    out = {}
    for only in (False, True):
        mbs = micro_batches(batch, 8, response_logits_only=only)
        stores, grads = grpo_passes(policy, reference, objective, mbs, batch.seq_length)
        out[only] = {"sums": reduce_sums(stores, objective.keys), "grads": grads.tolist(),
                     "logits_from": [mb["logits_from"] for mb in mbs]}
    ps.destroy_model_parallel()
    return out


def test_logits_at_response_positions_only_give_the_same_loss_and_gradients():
    (out,) = run_distributed(_response_logits_worker, 1, timeout=120)
    full, only = out[False], out[True]
    assert full["logits_from"] == [0, 0] and only["logits_from"] == [5, 5]  # the shortest prompt is 6 tokens
    assert only["sums"] == pytest.approx(full["sums"], rel=1e-6, abs=1e-6)
    assert only["grads"] == pytest.approx(full["grads"], rel=1e-5, abs=1e-9)


def test_reference_logprobs_and_scores_from_the_engine_give_the_learners_kl_and_rewards(
        uninterrupted, prompts, tmp_path):
    """rlvr.reference_logprobs: inference: the learner sends the reference to the engine once and
    runs no reference pass; the engine's log-probs give the same KL, loss and updates.
    rlvr.score_on: engine: the engine scores its completions (beside that pass) and the learner's
    rewards are the ones it would have scored itself."""
    run_dir, _ = uninterrupted
    cfg = _config(tmp_path, prompts, async_steps=1)
    cfg["rlvr"]["reference_logprobs"] = "inference"
    cfg["rlvr"]["score_on"] = "engine"
    _job(cfg)
    ours, theirs = _rows(tmp_path), _rows(run_dir)
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs):
        assert a["reward_mean"] == b["reward_mean"] and a["response_tokens"] == b["response_tokens"]
        assert a["kl"] > 0 and a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-7)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)
        assert "reference_s" in a and "reference_s" not in b
        assert "engine_score_wait_s" in a and "engine_score_wait_s" not in b
        assert a["verified_all"] == b["verified_all"] and a["score_errors"] == b["score_errors"] == 0
