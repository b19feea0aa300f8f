import pytest

from tulu.config.job import load_config
from tulu.plan.memory import GB
from tulu.config.shapes import ARCHITECTURES
from tulu.plan.layout import PlanError, build_plan, layers_per_stage


def test_parameter_counts_match_the_published_llama_3_1_sizes():
    # Meta's model cards: 8.03B, 70.6B, 405.9B (rounded).
    assert ARCHITECTURES["llama-3.1-8b"].num_params == pytest.approx(8.03e9, rel=0.002)
    assert ARCHITECTURES["llama-3.1-70b"].num_params == pytest.approx(70.55e9, rel=0.002)
    assert ARCHITECTURES["llama-3.1-405b"].num_params == pytest.approx(405.85e9, rel=0.002)


def test_405b_bf16_weights_are_810_gb():
    assert ARCHITECTURES["llama-3.1-405b"].num_params * 2 / GB == pytest.approx(810, rel=0.005)


def test_uneven_layer_split_puts_lighter_stages_at_the_ends():
    assert layers_per_stage(126, 10) == (11,) + (13,) * 8 + (11,)
    assert layers_per_stage(126, 6) == (21,) * 6
    assert sum(layers_per_stage(32, 10)) == 32
    with pytest.raises(ValueError):
        layers_per_stage(4, 5)


def test_405b_rlvr_plan_is_16_inference_plus_tp8_pp10_dp3_and_fits():
    plan = build_plan(load_config("configs/tulu3-405b-rlvr.yaml"))
    assert (plan.inference_gpus, plan.training_gpus) == (16, 240)
    assert (plan.training_tp, plan.training_pp, plan.training_dp) == (8, 10, 3)
    assert plan.training_mem.fits
    rows = {r.name.split(" (")[0]: r.gb for r in plan.training_mem.rows}
    # docs/design.md section 4: at PP10 weights+grads 20.3 GB, optimizer 20.3 GB, reference 10.1 GB,
    # for an even 12.6 layers per stage; the fullest stage has 13 layers (3% more).
    assert rows["policy weights"] + rows["gradients"] == pytest.approx(20.3 * 13 / 12.6, rel=0.02)
    assert rows["optimizer state"] == pytest.approx(20.3 * 13 / 12.6, rel=0.02)
    assert rows["frozen reference model"] == pytest.approx(10.1 * 13 / 12.6, rel=0.02)
    # vLLM: 810 GB over 16 GPUs = 50.6 GB each, ~15 GB left for the KV cache at 0.85; beside
    # vLLM's budget the weight sync's receive buffers: 5 stages at once x 3 x 256 MiB + the full
    # 4.2 GB embedding (less a bucket)
    inf = {r.name.split(" (")[0]: r.gb for r in plan.inference_mem.breakdown.rows}
    assert inf["weights"] == pytest.approx(50.6, rel=0.01)
    assert 14 < inf["KV cache"] < 17
    assert inf["weight-sync receive buffers"] == pytest.approx((15 * 2**28 + 128256 * 16384 * 2 - 2**28) / 1e9, rel=0.01)
    assert plan.inference_mem.breakdown.fits
    assert plan.bridge_size == 26
    text = plan.describe()
    assert "TP8 x PP10 x DP3" in text and "11, 13, 13" in text and "fits" in text


@pytest.mark.parametrize("override", ["groups.inference.gpu_memory_utilization=0.9",
                                      "rlvr.weight_sync_bucket_mb=1024"])
def test_405b_engines_without_room_for_the_weight_sync_buffers_are_refused(override):
    with pytest.raises(PlanError) as e:
        build_plan(load_config("configs/tulu3-405b-rlvr.yaml", [override]))
    assert e.value.key == "groups.inference.gpu_memory_utilization"
    assert "weight-sync receive buffers" in str(e.value) and "suggestion: gpu_memory_utilization <=" in str(e.value)


def test_fewer_weight_sync_streams_need_fewer_buffers():
    plan = build_plan(load_config("configs/tulu3-405b-rlvr.yaml", ["groups.inference.gpu_memory_utilization=0.9",
                                                                     "rlvr.weight_sync_streams=1"]))
    inf = {r.name: r.gb for r in plan.inference_mem.breakdown.rows}
    assert inf["weight-sync receive buffers"] == pytest.approx((2 * 2**28 + 128256 * 16384 * 2) / 1e9, rel=0.01)


def test_405b_pp6_dp5_is_refused_as_too_tight_with_a_suggestion():
    cfg = load_config("configs/tulu3-405b-rlvr.yaml", ["groups.training.pp=6", "groups.training.dp=5"])
    with pytest.raises(PlanError) as e:
        build_plan(cfg)
    msg = str(e.value)
    assert "DOES NOT FIT" in msg and "frozen reference model" in msg
    assert "pp=10, dp=3" in msg


def test_without_reference_model_pp6_would_have_fit_before_activations():
    # The reference model is what tips PP6 over (docs/design.md section 4).
    cfg = load_config("configs/tulu3-405b-rlvr.yaml", ["groups.training.pp=6", "groups.training.dp=5",
                                                        "rlvr.kl_beta=0.0", "rlvr.prompts_per_step=1860"])
    assert build_plan(cfg).training_mem.fits


def test_layout_that_does_not_divide_is_refused_with_allowed_values():
    with pytest.raises(PlanError) as e:
        build_plan(load_config("configs/tulu3-405b-rlvr.yaml", ["groups.training.pp=7"]))
    assert "groups.training.pp" in str(e.value) and "[1, 2, 3, 5, 6, 10, 15, 30]" in str(e.value)


def test_tp_that_crosses_nodes_is_refused():
    with pytest.raises(PlanError) as e:
        build_plan(load_config("configs/tulu3-405b-rlvr.yaml", ["groups.training.tp=16"]))
    assert "groups.training.tp" in str(e.value)


def test_inference_gpus_must_be_whole_engines():
    with pytest.raises(PlanError) as e:
        build_plan(load_config("configs/tulu3-405b-rlvr.yaml", ["groups.inference.gpus=12"]))
    assert "groups.inference.gpus" in str(e.value)


def test_distributed_optimizer_off_shows_the_unsharded_optimizer():
    plan = build_plan(load_config("configs/tulu3-405b-sft.yaml", ["groups.training.pp=32", "groups.training.dp=1"]))
    cfg = load_config("configs/tulu3-405b-sft.yaml", ["groups.training.distributed_optimizer=false"])
    with pytest.raises(PlanError) as e:
        build_plan(cfg)
    assert "with distributed optimizer" in str(e.value)
    assert plan.training_mem.fits


def test_roles_follow_megatron_rank_order_and_bridge_has_stage_leaders():
    plan = build_plan(load_config("configs/tiny-cpu-rehearse.yaml"))
    roles = [plan.role_of(r) for r in range(plan.world_size)]
    assert [r.role for r in roles] == ["inference"] * 2 + ["training"] * 6
    # TP1 x PP2 x DP3: training ranks 0..5 -> (dp, pp) = (0,0) (1,0) (2,0) (0,1) (1,1) (2,1)
    assert [(r.dp_rank, r.pp_rank) for r in roles[2:]] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert plan.bridge_members() == [2, 5, 0, 1]
    assert [roles[g].bridge_rank for g in plan.bridge_members()] == [0, 1, 2, 3]
    assert all(r.bridge_rank is None for i, r in enumerate(roles) if i not in plan.bridge_members())


def test_the_plan_says_how_many_nodes_are_spares():
    from pathlib import Path

    from tulu.plan.layout import spares_line

    path = Path(__file__).parents[2] / "configs" / "tiny-cpu-rehearse.yaml"
    assert spares_line(load_config(path).cluster) is None
    line = spares_line(load_config(path, ["cluster.spare_nodes=2"]).cluster)
    assert line.startswith("spare nodes: 2 (the job allocates 6 nodes: the training step runs on 4")
