"""The weight-sync scale model (tulu.dist.sync_model): which bytes cross which link for the RLVR
presets, and the predicted time `tulu plan` prints."""

import dataclasses
from pathlib import Path

import pytest

from tulu.config.job import load_config
from tulu.dist.sync_model import Links, model_sync, predicted_sync_seconds, sync_plan_lines

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def big():
    return load_config(str(CONFIGS / "tulu3-405b-rlvr.yaml"))


@pytest.fixture(scope="module")
def small():
    return load_config(str(CONFIGS / "tulu3-8b-rlvr.yaml"))


def test_each_405b_engine_node_takes_its_pp_stage_once_through_five_nics_at_once(big):
    m = model_sync(big)
    total, stages = m["facts"]["bytes"], m["facts"]["engine_stage_gb"]
    assert abs(total / 1e9 - 811.7) < 0.1 and len(stages) == 2
    routed = m["designs"]["nccl_routed_fanout"]
    # one engine TP8 x PP2 on 2 nodes: each node takes half the model once over IB and fans it out
    # over NVLink; its 5 training stages (11 + 13 x 4 = 63 layers) come in through 5 head GPUs at once
    assert abs(routed.link_bytes["engine_node_fanout_nvlink_in"] / 1e9 - stages[0]) < 0.1
    assert routed.link_bytes["engine_head_nic_in"] == routed.link_bytes["stage_leader_nic_out"]   # one stage
    assert abs(routed.link_bytes["engine_head_nic_in"] / 1e9 - 82.9) < 0.1
    # a stage leader's NIC (and a head's) at 400 Gb/s x 0.8 is the busiest link: <= 10 s, the goal
    assert routed.predicted_s == pytest.approx(82.9 / 40, abs=0.01) and routed.predicted_s <= 10.0


def test_one_stream_at_a_time_queues_405b_at_one_nic_per_node(big):
    one = dataclasses.replace(big, rlvr=dataclasses.replace(big.rlvr, weight_sync_streams=1))
    routed = model_sync(one)["designs"]["nccl_routed_fanout"]
    stage_gb = model_sync(big)["facts"]["engine_stage_gb"][0]
    # stages one after another: the node's half of the model through one NIC's time
    assert routed.predicted_s == pytest.approx(stage_gb / 40, abs=0.01) and routed.predicted_s > 10.0


def test_tp_sharded_sends_spread_405b_over_every_nic(big):
    d = model_sync(big)["designs"]
    sharded = d["nccl_tp_sharded"]
    assert sharded.applies and sharded.predicted_s <= d["nccl_routed_fanout"].predicted_s
    assert sharded.link_bytes["engine_gpu_nic_in"] * 8 == pytest.approx(
        d["nccl_routed_fanout"].link_bytes["engine_node_fanout_nvlink_in"], rel=1e-6)


def test_8b_engines_on_one_node_share_one_copy_and_tp_sharding_does_not_apply(small):
    m = model_sync(small)
    d = m["designs"]
    assert not d["nccl_tp_sharded"].applies            # training TP4, engines TP1
    assert d["nccl_routed_fanout"].link_bytes["engine_head_nic_in"] == m["facts"]["bytes"]   # not 8x
    assert d["gloo_host"].link_bytes["engine_node_fanout_gloo_out"] == 7 * m["facts"]["bytes"]
    assert predicted_sync_seconds(small) < 1.0


def test_tulu_plan_warns_when_the_sync_nears_the_phase_timeout(big):
    ok = sync_plan_lines(big)
    assert len(ok) == 1 and "predicted 2.1 s on NCCL" in ok[0]
    slow = sync_plan_lines(big, links=Links(ib_gbit_per_nic=4.0))    # 0.5 GB/s NICs: ~207 s
    assert slow[1].startswith("WARNING") and "monitoring.phase_timeouts_s.weight_sync" in slow[1]


def test_an_unknown_design_is_refused_with_the_known_ones(small):
    with pytest.raises(ValueError, match="gloo_host, nccl_routed_fanout, nccl_tp_sharded"):
        predicted_sync_seconds(small, design="rdma")


def test_a_job_without_engines_has_no_sync_line_and_no_prediction():
    sft = load_config(str(CONFIGS / "tulu3-8b-sft.yaml"))
    assert sync_plan_lines(sft) == []
    with pytest.raises(ValueError, match="no inference engines"):
        predicted_sync_seconds(sft)


def test_the_tulu_command_prints_the_prediction_for_rlvr_only(capsys):
    from tulu.cli import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    assert main(["plan", str(configs / "tulu3-405b-rlvr.yaml")]) == 0
    assert "weight sync: 811.7 GB per sync, predicted" in capsys.readouterr().out
    assert main(["plan", str(configs / "tulu3-405b-sft.yaml")]) == 0
    assert "weight sync:" not in capsys.readouterr().out
