"""What a flagship preset would only find out inside its allocation is refused by `tulu plan`,
naming the key: batch geometry, a value model without weights, time-outs that fire before the
monitor decides; and each engine rank gets its own GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu.config.job import ConfigError, load_config
from tulu.plan.layout import PlanError, build_plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FLAGSHIPS = sorted(p.name for p in CONFIGS.glob("tulu3-*.yaml"))


@pytest.mark.parametrize("preset", FLAGSHIPS)
def test_every_flagship_preset_plans(preset):
    build_plan(load_config(CONFIGS / preset))


def test_rlvr_rollouts_that_do_not_split_over_dp_are_refused_by_key():
    # the paper's 1,856 prompts x 1 sample over TP8 x PP10 x DP3: the learner refused it at setup,
    # after the queue wait
    with pytest.raises(PlanError) as err:
        build_plan(load_config(CONFIGS / "tulu3-405b-rlvr.yaml", ["rlvr.prompts_per_step=1856"]))
    assert err.value.key == "rlvr.prompts_per_step"
    assert "DP (3)" in str(err.value) and "1854, 1857" in str(err.value)


def test_grpo_groups_count_in_the_rollouts():
    cfg = load_config(CONFIGS / "tulu3-8b-rlvr.yaml",
                      ["rlvr.algorithm=grpo", "rlvr.samples_per_prompt=3", "rlvr.prompts_per_step=5",
                       "model.value_model=null", "groups.training.micro_batch_size=2"])
    with pytest.raises(PlanError) as err:   # 15 rollouts over micro-batch 2 x DP2
        build_plan(cfg)
    assert err.value.key == "rlvr.prompts_per_step"
    assert "micro_batch_size (2) x DP (2) = 4" in str(err.value)


@pytest.mark.parametrize("preset,stage", [("tulu3-405b-sft.yaml", "sft"), ("tulu3-8b-dpo.yaml", "dpo")])
def test_sft_and_dpo_global_batch_that_does_not_split_over_dp_is_refused_by_key(preset, stage):
    with pytest.raises(PlanError) as err:
        build_plan(load_config(CONFIGS / preset, [f"{stage}.global_batch_size=130"]))
    assert err.value.key == f"{stage}.global_batch_size"
    assert "Allowed nearby: 128, 132" in str(err.value)


def test_a_shape_name_as_ppo_value_model_is_refused_it_has_no_weights():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tulu3-405b-rlvr.yaml", ["model.value_model=llama-3.1-8b"])
    assert err.value.key == "model.value_model"
    assert "no weights" in str(err.value)


@pytest.mark.parametrize("preset", FLAGSHIPS + ["tiny-cpu-sft.yaml", "tiny-cpu-rlvr.yaml"])
def test_collective_timeouts_outlast_every_monitor_timeout(preset):
    m = load_config(CONFIGS / preset).monitoring
    longest = max(m.default_timeout_s, m.stall_timeout_s, *m.phase_timeouts_s.values())
    assert m.collective_timeout_s >= longest + 120


def test_process_groups_use_the_collective_timeout_not_the_default_phase_timeout():
    root = Path(__file__).resolve().parents[2] / "tulu"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "timeout_s=cfg.monitoring.default_timeout_s" in p.read_text().replace("ctx.cfg", "cfg")]
    assert offenders == []


def test_learned_timeouts_never_exceed_the_jobs_longest_configured_one():
    from monitoring.config import MonitorConfig
    from monitoring.detect import Detector

    from tulu.launch.executor import monitor_settings

    cfg = load_config(CONFIGS / "tulu3-405b-rlvr.yaml")
    mc = MonitorConfig.from_json(monitor_settings(cfg).to_json())   # as the batch script reads it
    assert mc.max_learned_s == 5400.0                       # the preset's stall time-out
    d = Detector(mc, world_size=1, attempt=0, start_time=0.0)
    d.observed["train"] = (3000.0, 5)                       # 5 x 3000 s would be 15000 s
    assert d.timeout_for("train") == (5400.0, "learned")
    assert mc.max_learned_s + 120 <= cfg.monitoring.collective_timeout_s


@pytest.mark.parametrize("visible,local_rank,gpu", [
    ("0,1,2,3,4,5,6,7", 5, "5"),      # --gpus-per-node: every task sees the whole node
    ("4,5,6,7", 2, "6"),              # a node share: the task's position in the list
    ("3", 6, "3"),                    # Slurm bound the task already
    ("", 0, None), (None, 0, None),
])
def test_each_task_gets_its_own_gpu(monkeypatch, visible, local_rank, gpu):
    from tulu.dist.groups import task_gpu

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert task_gpu(local_rank) == gpu


@pytest.mark.parametrize("preset", FLAGSHIPS)
def test_a_90_s_time_limit_warning_is_refused_where_a_step_and_a_save_take_longer(preset):
    with pytest.raises(PlanError) as err:
        build_plan(load_config(CONFIGS / preset, ["cluster.signal_delay_s=90"]))
    assert err.value.key == "cluster.signal_delay_s"
    assert "GB over" in str(err.value) and "safety_factor" in str(err.value)


def test_the_405b_rlvr_warning_covers_its_phases_and_a_5_8_tb_save():
    from tulu.plan.layout import checkpoint_bytes, time_limit_warning_s

    cfg = load_config(CONFIGS / "tulu3-405b-rlvr.yaml")
    plan = build_plan(cfg)
    # 405.9B policy + 8.0B value model, each bf16 weights + fp32 master, m and v (14 bytes/param)
    assert checkpoint_bytes(cfg, plan.shape) / 1e12 == pytest.approx(5.79, abs=0.01)
    need, why = time_limit_warning_s(cfg, plan)
    assert need == pytest.approx((1800 + 3600 + 300) / 5 + 5.794e12 / 30 / 1e9, rel=1e-3)
    assert cfg.cluster.signal_delay_s >= need
