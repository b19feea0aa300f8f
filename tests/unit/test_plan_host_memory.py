"""`tulu plan` counts the checkpoint save: its GPU transient joins each training GPU's breakdown
and its host-RAM peak (Megatron's distributed optimizer gathered on DP rank 0, then cloned by the
file writer) joins a per-node host breakdown, refused by `cluster.host_memory_gb`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu.config.job import ConfigError, load_config
from tulu.plan.layout import PlanError, build_plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _row(breakdown, start: str):
    rows = [r for r in breakdown.rows if r.name.startswith(start)]
    assert rows, [r.name for r in breakdown.rows]
    return rows[0]


# The fullest node's host RAM (GB): 8 tasks x (save or load peak + 4 data + 4 runtime).
# 405B SFT/DPO, TP8 x PP8 x DP4: a 16-layer stage shard is 6.4B parameters, 76.5 GB of fp32 state;
# DP rank 0 holds it twice (gathered + the writer's clones) + its own quarter: 153.0 GB per task.
# 405B RLVR, TP8 x PP10 x DP3: 13 layers + the 8B value model's share, 63.4 GB: 126.7 GB per task.
# 8B SFT, TP2 x DP4 on one node: the load (every task reads its 48.2 GB) beats the save (2 DP-0 tasks).
@pytest.mark.parametrize("preset, host_gb, save_each_gb", [
    ("tulu3-405b-sft.yaml", 1288.1, 153.0),
    ("tulu3-405b-dpo.yaml", 1288.1, 153.0),
    ("tulu3-405b-rlvr.yaml", 1077.8, 126.7),
    ("tulu3-8b-sft.yaml", 449.5, 48.2),
])
def test_flagship_host_ram_per_node_counts_the_checkpoint_peak(preset, host_gb, save_each_gb):
    plan = build_plan(load_config(CONFIGS / preset))
    assert plan.host_mem.total_gb == pytest.approx(host_gb, abs=0.1)
    peak = _row(plan.host_mem, "training 8 x checkpoint")
    assert peak.gb / 8 == pytest.approx(save_each_gb, abs=0.1)
    assert plan.host_mem.fits and plan.host_mem.capacity_gb == 2000
    assert "host RAM per node" in plan.describe()


def test_a_layout_that_fits_the_gpus_but_not_host_ram_is_refused_by_host_memory_gb():
    cfg = load_config(CONFIGS / "tulu3-405b-sft.yaml", ["cluster.host_memory_gb=1000"])
    with pytest.raises(PlanError) as err:
        build_plan(cfg)
    assert err.value.key == "cluster.host_memory_gb"
    text = str(err.value)
    assert "1288 GB" in text and "900 GB usable" in text
    assert "checkpoint save peak on DP rank 0" in text  # the breakdown comes with the refusal
    # and the GPUs alone would have fitted
    assert build_plan(load_config(CONFIGS / "tulu3-405b-sft.yaml")).training_mem.fits


def test_a_slurm_memory_limit_below_the_need_is_refused_by_mem_gb():
    cfg = load_config(CONFIGS / "tulu3-405b-rlvr.yaml", ["cluster.mem_gb=1000"])
    with pytest.raises(PlanError) as err:
        build_plan(cfg)
    assert err.value.key == "cluster.mem_gb" and "1078" in str(err.value)


def test_host_memory_gb_must_be_positive():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tulu3-8b-sft.yaml", ["cluster.host_memory_gb=0"])
    assert err.value.key == "cluster.host_memory_gb"


@pytest.mark.parametrize("preset, nccl_gb", [("tulu3-405b-sft.yaml", 31.9), ("tulu3-405b-rlvr.yaml", 28.2),
                                             ("tulu3-8b-dpo.yaml", 20.1)])
def test_gpu_breakdown_has_the_save_peak_of_the_host_side_gather(preset, nccl_gb):
    mem = build_plan(load_config(CONFIGS / preset)).training_mem
    row = _row(mem, "checkpoint save peak")
    assert row.gb == pytest.approx(0.5)
    # Megatron's default NCCL gather would need a whole stage shard's fp32 key on the GPU: the
    # preset would not fit with it, which is why the save gathers in host RAM
    assert f"NCCL gather: {nccl_gb} GB" in row.alternative
    assert mem.total_gb - row.gb + nccl_gb > mem.usable_gb


def test_the_checkpoint_code_saves_the_way_the_plan_counts():
    from tulu.checkpoint.sharded import OPTIMIZER_METADATA

    assert OPTIMIZER_METADATA == {"distrib_optim_sharding_type": "fully_reshardable",
                                  "distrib_optim_fully_reshardable_mem_efficient": True}


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("tiny-cpu*.yaml")))
def test_tiny_presets_plan_with_a_small_host_footprint(preset):
    for plan in _plans(CONFIGS / preset):
        assert plan.host_mem.fits and plan.host_mem.total_gb < 20
        assert plan.host_mem.capacity_gb == 1000  # the default


def _plans(path):
    from tulu.config.job import load_raw
    from tulu.pipeline.config import config_kind, load_pipeline
    from tulu.pipeline.driver import plan_stages

    if config_kind(load_raw(path)) == "pipeline":  # one plan per stage
        return list(plan_stages(load_pipeline(path, [])).values())
    return [build_plan(load_config(path))]
