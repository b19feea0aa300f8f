"""PPO with the RLVR presets' training features at their smallest degree: TP2 with sequence
parallelism, DP2 with Megatron's distributed optimizer for both the policy and the value model.
The value model gives TP1's values, two PPO steps give TP1's metrics (replicated optimizer, no
SP), and a checkpoint of policy + value + both distributed optimizers, loaded by fresh models,
repeats the second step exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import run_distributed  # noqa: E402
from tests.multiproc.test_rlvr_ppo import RTOL, _build, _config, _fixed_batch, _micro_batches  # noqa: E402

pytestmark = pytest.mark.multiproc

KEYS = ("loss", "pg_loss", "kl", "value_loss", "explained_variance", "returns_mean", "values_mean",
        "grad_norm", "value_grad_norm", "response_tokens")


def _worker(rank, world_size, tp, dp, sharded, run_dir):
    import multiprocessing as mp

    import torch

    mp.current_process()._config["daemon"] = False  # Megatron's checkpoint writer forks
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from tulu.checkpoint import CheckpointManager
    from tulu.checkpoint.sharded import _megatron_parts
    from tulu.config.job import config_from_dict
    from tulu.models import megatron_cpu
    from tulu.train.rl_objectives import PPOObjective, ppo_step, run_logits_schedule

    megatron_cpu.apply()
    ps.initialize_model_parallel(tp, 1)
    torch.manual_seed(0)
    d = _config(tp, 1, dp, run_dir)
    d["groups"]["training"].update(distributed_optimizer=sharded, sequence_parallel=sharded)
    cfg = config_from_dict(d)
    source, policy, reference, value, state = _build(cfg)
    out = {"tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
           "sp": [m.config.sequence_parallel for m in (policy.module, value.module)],
           "distributed": all(isinstance(p, DistributedOptimizer) for p in _megatron_parts(state.optimizer))}
    batch = _fixed_batch()
    L = batch.seq_length
    mbs = _micro_batches(batch, dp, out["dp_rank"])
    with torch.no_grad():
        value.ddp.eval()
        run_logits_schedule(value.ddp, mbs, PPOObjective.values_fn, seq_length=L, forward_only=True)
    out["values"] = torch.cat([mb["old_values"] for mb in mbs]).reshape(-1).tolist()
    objective = PPOObjective(cfg.rlvr)
    ckpt = CheckpointManager(Path(run_dir) / "checkpoints", keep_last=2)
    out["steps"] = []
    for step in range(2):
        mbs = _micro_batches(batch, dp, out["dp_rank"])
        out["steps"].append(ppo_step(objective, policy, value, reference, mbs, seq_length=L, lr=3e-3, value_lr=3e-3))
        if sharded and step == 0:
            ckpt.save(1, state, optimizer=state.optimizer, extra_state={"model_source": source.describe()})
    if sharded:  # fresh models and optimizers (no Adam state), restored from step 1, repeat step 2
        torch.manual_seed(123)
        source, policy, reference, value, state = _build(cfg)
        loaded = ckpt.load(state, optimizer=state.optimizer)
        state.restore(loaded.model_state)
        out["not_restored"] = loaded.not_restored
        mbs = _micro_batches(batch, dp, out["dp_rank"])
        out["resumed"] = ppo_step(objective, policy, value, reference, mbs, seq_length=L, lr=3e-3, value_lr=3e-3)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    plain = run_distributed(_worker, 1, 1, 1, False, str(tmp_path_factory.mktemp("tp1")), timeout=180)
    sharded = run_distributed(_worker, 4, 2, 2, True, str(tmp_path_factory.mktemp("tp2_sp_dp2")), timeout=300)
    return plain[0], sharded


def test_ppo_runs_with_sequence_parallel_and_distributed_optimizers(runs):
    plain, ranks = runs
    assert plain["sp"] == [False, False] and not plain["distributed"]
    for r in ranks:
        assert r["sp"] == [True, True] and r["distributed"], r


def test_sharded_value_model_gives_the_tp1_values(runs):
    plain, ranks = runs
    got = []
    for r in sorted((r for r in ranks if r["tp_rank"] == 0), key=lambda r: r["dp_rank"]):
        got += r["values"]
    assert got == pytest.approx(plain["values"], rel=RTOL, abs=1e-6)


def test_sharded_ppo_steps_give_the_tp1_metrics(runs):
    plain, ranks = runs
    for step, expected in enumerate(plain["steps"]):
        for r in ranks:
            for k in KEYS:
                assert r["steps"][step][k] == pytest.approx(expected[k], rel=RTOL, abs=1e-6), (step, k)


def test_policy_value_and_both_distributed_optimizers_resume_the_next_step_exactly(runs):
    for r in runs[1]:
        assert r["not_restored"] == []
        assert r["resumed"] == r["steps"][1]
