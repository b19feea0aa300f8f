"""PPO in the RLVR training group, on real gloo process groups: the value model (the policy's
Llama with a scalar head, in Megatron DDP with its own optimizer) gives the same values under
TP=1, TP=2, PP=2 and DP=2; one PPO step computes the same metrics in every layout and lowers both
its policy and its value loss on its own batch; the replicated value head stays identical on
the TP ranks; and a checkpoint holding policy + value + both optimizers resumes to the same next
step, while a policy-only reader still loads the policy from it (and ``model.value_model`` can
start a value model from it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import run_distributed  # noqa: E402

pytestmark = pytest.mark.multiproc

RTOL = 1e-4  # TP/PP/DP change the order of fp32 sums
MICRO = 2
STEPS = 2


def _config(tp: int, pp: int, dp: int, run_dir: str, value_model: str | None = None) -> dict:
    return {
        "stage": "rlvr", "mode": "train",
        "cluster": {"executor": "local", "nodes": 1, "gpus_per_node": tp * pp * dp + 1},
        "groups": {"inference": {"gpus": 1, "engine": "transformers", "max_model_len": 64},
                   "training": {"tp": tp, "pp": pp, "dp": dp, "distributed_optimizer": False,
                                "micro_batch_size": MICRO}},
        "model": {"dtype": "fp32", "tiny": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 2, "num_attention_heads": 4,
                                            "num_key_value_heads": 2, "max_position_embeddings": 64},
                  "value_model": value_model},
        "rlvr": {"algorithm": "ppo", "optim": {"lr": 3.0e-3, "lr_schedule": "constant", "warmup_ratio": 0.0},
                 "value_lr": 3.0e-3, "steps": 10, "prompts_per_step": 8, "samples_per_prompt": 1,
                 "response_length": 8, "kl_beta": 0.05, "verified_reward": 10.0},
        "checkpoint": {"interval": 100, "keep_last": 2},
        "monitoring": {"enabled": False},
        "run": {"name": "ppo", "dir": run_dir, "seed": 11},
    }


def _fixed_batch():
    """8 rollouts of different prompt and response lengths; half verified (score 10)."""
    import torch

    from tulu.rlvr.batch import Rollout, build_batch

    g = torch.Generator().manual_seed(3)
    rollouts = []
    for i in range(8):
        p, r = 3 + i % 3, 2 + (5 * i) % 6
        prompt = torch.randint(1, 64, (p,), generator=g).tolist()
        response = torch.randint(1, 64, (r,), generator=g).tolist()
        rollouts.append(Rollout(i, prompt, response, [-4.0] * r, "stop", "math", "1"))
    scores = torch.tensor([10.0, 0.0, 10.0, 0.0, 0.0, 10.0, 10.0, 0.0])
    return build_batch(rollouts, scores, torch.zeros(8), pad_id=0)


def _build(cfg):
    from tulu.rlvr.value import PolicyAndValueState, build_value_model
    from tulu.train import model as tmodel

    source = tmodel.resolve_model(cfg.model, cfg.run.seed)
    policy = tmodel.build_policy(cfg, source)
    reference = tmodel.build_reference(cfg, source)
    value = build_value_model(cfg, source)
    return source, policy, reference, value, PolicyAndValueState(policy, value)


def _micro_batches(batch, dp, dp_rank):
    from tulu.rlvr.batch import micro_batches

    n = batch.tokens.shape[0] // dp
    mine = batch.rows(dp_rank * n, (dp_rank + 1) * n)
    mbs = micro_batches(mine, MICRO)
    for k, mb in enumerate(mbs):
        mb["scores"] = mine.scores[k * MICRO:(k + 1) * MICRO]
    return mbs


def _forward_sums(model, mbs, loss_fn, keys, seq_length):
    """The loss_fn's metric sums at the model's current weights, forward only (global batch)."""
    import torch

    from tulu.train.rl_objectives import run_logits_schedule
    from tulu.train.step import reduce_sums

    with torch.no_grad():
        model.eval()
        stores = run_logits_schedule(model, mbs, loss_fn, seq_length=seq_length, forward_only=True)
    return reduce_sums(stores, keys)


def _ppo_worker(rank, world_size, tp, pp, dp, run_dir, resume_check):
    import multiprocessing as mp

    import torch

    # Megatron's checkpoint writer forks helper processes; run_distributed's children are
    # daemonic, which forbids that (Slurm tasks are not): lift the flag in the test harness.
    mp.current_process()._config["daemon"] = False
    from megatron.core import parallel_state as ps

    from tulu.checkpoint import CheckpointManager
    from tulu.config.job import config_from_dict
    from tulu.models import megatron_cpu
    from tulu.train.rl_objectives import PPOObjective, ppo_step, run_logits_schedule
    from tulu.train.model import StageCheckpoint, build_policy, resolve_model

    megatron_cpu.apply()
    ps.initialize_model_parallel(tp, pp)
    torch.manual_seed(0)
    cfg = config_from_dict(_config(tp, pp, dp, run_dir))
    source, policy, reference, value, state = _build(cfg)
    batch = _fixed_batch()
    L = batch.seq_length
    dp_rank = ps.get_data_parallel_rank()
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    out = {"rank": rank, "dp_rank": dp_rank, "tp_rank": ps.get_tensor_model_parallel_rank(), "last": last}

    mbs = _micro_batches(batch, dp, dp_rank)
    with torch.no_grad():
        value.ddp.eval()
        run_logits_schedule(value.ddp, mbs, PPOObjective.values_fn, seq_length=L, forward_only=True)
    if last:
        out["values"] = torch.cat([mb["old_values"] for mb in mbs]).reshape(-1).tolist()

    if last:
        out["head_init"] = [p.detach().clone().reshape(-1).tolist() for p in value.module.output_layer.parameters()]
    objective = PPOObjective(cfg.rlvr)
    ckpt = CheckpointManager(Path(run_dir) / "checkpoints", keep_last=2)
    out["steps"], out["after"] = [], []
    for step in range(STEPS):
        mbs = _micro_batches(batch, dp, dp_rank)
        metrics = ppo_step(objective, policy, value, reference, mbs, seq_length=L, lr=3e-3, value_lr=3e-3)
        out["steps"].append(metrics)
        # the same batch, targets and advantages at the updated weights
        pol = _forward_sums(policy.ddp, mbs, objective.loss_fn, objective.keys, L)
        val = _forward_sums(value.ddp, mbs, objective.value_loss_fn, objective.value_keys, L)
        out["after"].append({"pg_loss": pol["pg_loss"] / pol["tokens"],
                             "value_loss": val["value_loss"] / val["value_tokens"]})
        if resume_check and step == 0:
            ckpt.save(1, state, optimizer=state.optimizer, extra_state={"model_source": source.describe()})
    if last:
        out["head"] = [p.detach().clone().reshape(-1).tolist() for p in value.module.output_layer.parameters()]

    if resume_check:  # fresh models, restored from step 1, repeat step 2
        torch.manual_seed(123)
        source, policy, reference, value, state = _build(cfg)
        loaded = ckpt.load(state, optimizer=state.optimizer)
        state.restore(loaded.model_state)
        out["resumed_step"] = loaded.step
        restored = {k: v.clone() for k, v in policy.module.state_dict().items()
                    if isinstance(v, torch.Tensor) and "_extra_state" not in k}
        mbs = _micro_batches(batch, dp, dp_rank)
        out["resumed"] = ppo_step(objective, policy, value, reference, mbs, seq_length=L, lr=3e-3, value_lr=3e-3)
        # a policy-only reader (a later stage, tulu export) ignores the value model's keys
        plain = build_policy(cfg, resolve_model(cfg.model, cfg.run.seed))
        StageCheckpoint(loaded.path).load_into(plain.module)
        plain_sd = plain.module.state_dict()
        out["policy_only_load_matches"] = all(torch.equal(v, plain_sd[k]) for k, v in restored.items())
        # model.value_model naming a tulu checkpoint: the value model starts from its weights
        from tulu.rlvr.value import build_value_model

        other = build_value_model(config_from_dict(_config(tp, pp, dp, run_dir, str(loaded.path))), source)
        other_sd = other.module.state_dict()
        out["value_model_from_checkpoint"] = all(torch.equal(v, other_sd[k]) for k, v in restored.items()
                                                 if not k.startswith("output_layer."))
    ps.destroy_model_parallel()
    return out


def _run(tp, pp, dp, tmp_path, resume_check=False):
    return run_distributed(_ppo_worker, tp * pp * dp, tp, pp, dp, str(tmp_path), resume_check, timeout=300)


def _values(ranks) -> list[float]:
    """The global batch's values, in row order (last stage, TP rank 0, by DP rank)."""
    out = []
    for r in sorted((r for r in ranks if r["last"] and r["tp_rank"] == 0), key=lambda r: r["dp_rank"]):
        out += r["values"]
    return out


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    return _run(1, 1, 1, tmp_path_factory.mktemp("tp1"))


def test_one_ppo_step_lowers_its_policy_and_value_loss_on_its_batch(tp1):
    (r,) = tp1
    for metrics, after in zip(r["steps"], r["after"]):
        assert after["value_loss"] < metrics["value_loss"] * 0.99, (metrics, after)
        assert after["pg_loss"] < metrics["pg_loss"] - 1e-3, (metrics, after)
    first = r["steps"][0]
    assert first["value_loss"] > 1.0 and first["response_tokens"] == sum(2 + (5 * i) % 6 for i in range(8))
    assert first["value_clip_frac"] == 0.0  # first epoch: the values are the old values
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-9)  # and the ratio is 1
    assert -1.0 <= first["explained_variance"] <= 1.0 and first["reward_kl"] == pytest.approx(0.0, abs=1e-9)
    assert r["steps"][1]["reward_kl"] > 0  # the policy moved away from the reference


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "dp2"])
def test_value_model_and_ppo_step_agree_across_layouts(layout, tp1, tmp_path):
    ranks = _run(*layout, tmp_path, resume_check=layout == (2, 1, 1))
    assert _values(ranks) == pytest.approx(_values(tp1), rel=RTOL, abs=1e-6)
    for step, expected in enumerate(tp1[0]["steps"]):
        for r in ranks:
            for k in ("loss", "pg_loss", "kl", "value_loss", "explained_variance", "returns_mean", "values_mean",
                      "grad_norm", "value_grad_norm", "response_tokens"):
                assert r["steps"][step][k] == pytest.approx(expected[k], rel=RTOL, abs=1e-6), (layout, step, k)
    heads = [r["head"] for r in ranks if r["last"]]
    assert all(h == heads[0] for h in heads)  # TP (and DP) replicas of the head never drift apart
    assert heads[0] != [r["head_init"] for r in ranks if r["last"]][0]  # and they did train
    if layout == (2, 1, 1):
        for r in ranks:
            assert r["resumed_step"] == 1
            assert r["resumed"] == r["steps"][1]  # policy, value and both Adam states restored
            assert r["policy_only_load_matches"] and r["value_model_from_checkpoint"]
