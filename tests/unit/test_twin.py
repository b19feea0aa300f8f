"""Every preset has a miniature twin derived by code that keeps its structural features
(docs/design.md section 10); the twin plans against the tiny model its offline hub mirror serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu.config.job import load_config
from tulu.plan.layout import build_plan, layers_per_stage
from tulu.twin import derive_twin, write_twin

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("tulu3-*.yaml"))


def _degree(preset: int, twin: int) -> None:
    assert twin == (1 if preset == 1 else twin) and (twin >= 2) == (preset > 1)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_twin_keeps_every_structural_feature_of_its_preset(preset):
    cfg = load_config(CONFIGS / preset)
    plan = build_plan(cfg)
    twin = derive_twin(CONFIGS / preset)
    t = twin.config
    tr, ptr = t["groups"]["training"], cfg.groups.training
    for twin_degree, preset_degree in ((tr["tp"], plan.training_tp), (tr["pp"], plan.training_pp),
                                       (tr["dp"], plan.training_dp)):
        _degree(preset_degree, twin_degree)
    for key in ("sequence_parallel", "distributed_optimizer", "recompute", "grad_dtype", "micro_batch_size"):
        assert tr[key] == getattr(ptr, key), key
    assert t["model"]["dtype"] == cfg.model.dtype
    assert t["model"]["name_or_path"] == cfg.model.name_or_path          # a hub id, served offline
    assert t["model"].get("value_model") == cfg.model.value_model
    assert t["data"]["train"] == cfg.data.train
    assert t["stage"] == cfg.stage
    split = layers_per_stage(twin.num_layers, tr["pp"])
    assert (len(set(split)) > 1) == (len(set(plan.layers)) > 1)          # uneven stays uneven
    if len(set(plan.layers)) > 1:
        assert (split[0] < max(split)) == (plan.layers[0] < max(plan.layers))   # lighter edges stay lighter
    if cfg.groups.inference.gpus:
        inf = t["groups"]["inference"]
        _degree(cfg.groups.inference.tp, inf["tp"])
        _degree(cfg.groups.inference.pp, inf["pp"])
        assert inf["engine"] == cfg.groups.inference.engine
        engines = inf["gpus"] // (inf["tp"] * inf["pp"])
        _degree(plan.inference_engines, engines)
        stage_cfg = t["rlvr"]
        assert stage_cfg["algorithm"] == cfg.rlvr.algorithm and stage_cfg["kl_beta"] == cfg.rlvr.kl_beta
    phases = cfg.monitoring.phase_timeouts_s
    if phases:   # ratios kept, scaled down
        scaled = t["monitoring"]["phase_timeouts_s"]
        assert set(scaled) == set(phases) and max(scaled.values()) < max(phases.values())
    assert twin.tasks <= 16


def test_the_405b_twins_have_a_middle_stage_like_their_presets():
    twin = derive_twin(CONFIGS / "tulu3-405b-rlvr.yaml")
    assert twin.config["groups"]["training"]["pp"] == 3
    assert layers_per_stage(twin.num_layers, 3) == (1, 2, 1)   # preset: 11, 13 x 8, 11


@pytest.mark.parametrize("preset", ["tulu3-405b-rlvr.yaml", "tulu3-8b-dpo.yaml"])
def test_the_written_twin_plans_against_its_tiny_mirror_model(preset, tmp_path):
    twin = derive_twin(CONFIGS / preset)
    path = write_twin(twin, tmp_path / "twin")
    plan = build_plan(load_config(path))
    assert plan.shape.num_params < 5e6 and plan.shape.num_layers == twin.num_layers
    assert plan.training_tp * plan.training_pp * plan.training_dp + plan.inference_gpus == twin.tasks
    hub = tmp_path / "twin" / "hub"
    for repo in twin.hub_models:
        assert (hub / f"models--{repo.replace('/', '--')}" / "refs" / "main").exists()
    assert "kept:" in (tmp_path / "twin" / "report.txt").read_text()
