from pathlib import Path

import pytest

from tulu.config.job import ConfigError, apply_overrides, load_config, parse_config
from tulu.config.schema import ConfigError as SchemaError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

PRESETS = ["tiny-cpu-sft", "tiny-cpu-dpo", "tiny-cpu-rlvr", "tiny-cpu-rehearse", "tulu3-8b-sft", "tulu3-8b-dpo",
           "tulu3-8b-rlvr", "tulu3-405b-sft", "tulu3-405b-dpo", "tulu3-405b-rlvr"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.run.name == name
    assert cfg.stage_config is not None


def test_tulu3_405b_rlvr_preset_carries_the_papers_hyperparameters():
    cfg = load_config("configs/tulu3-405b-rlvr.yaml")
    r = cfg.rlvr
    assert (r.algorithm, r.kl_beta, r.optim.lr, r.response_length, r.verified_reward) == ("ppo", 0.05, 1e-7, 1024, 10.0)
    assert r.prompts_per_step == 1857  # the paper's 1,856 does not split over DP3 (tulu plan refuses it)
    assert cfg.model.value_model == "allenai/Llama-3.1-Tulu-3-8B-DPO"  # an 8B value model with weights
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node, cfg.groups.inference.gpus) == (32, 8, 16)


def test_dpo_presets_are_length_normalised_with_beta_5():
    for name, lr in (("tulu3-8b-dpo", 5e-7), ("tulu3-405b-dpo", 2e-7)):
        d = load_config(f"configs/{name}.yaml").dpo
        assert (d.loss, d.beta, d.optim.lr) == ("dpo_norm", 5.0, lr)


def _error(data) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return str(e.value)


def test_unknown_key_is_refused_with_its_dotted_path_and_the_valid_keys():
    msg = _error({"groups": {"training": {"tpp": 2}}})
    assert msg.startswith("groups.training.tpp: unknown key")
    assert "tp" in msg and "pp" in msg and "dp" in msg


def test_wrong_type_names_key_value_and_expected_type():
    msg = _error({"cluster": {"nodes": "four"}})
    assert "cluster.nodes" in msg and "'four'" in msg and "integer" in msg


def test_bool_is_not_accepted_as_an_integer():
    assert "cluster.nodes" in _error({"cluster": {"nodes": True}})


def test_literal_lists_the_allowed_values():
    msg = _error({"stage": "rlvr", "groups": {"inference": {"gpus": 1}}, "rlvr": {"algorithm": "reinforce"}})
    assert "rlvr.algorithm" in msg and "'ppo'" in msg and "'grpo'" in msg


def test_impossible_values_are_refused():
    assert "rlvr.samples_per_prompt" in _error(
        {"stage": "rlvr", "groups": {"inference": {"gpus": 1}}, "rlvr": {"algorithm": "grpo", "samples_per_prompt": 1}})
    assert "cluster.signal_delay_s" in _error({"cluster": {"time_limit_min": 1, "signal_delay_s": 90}})
    assert "groups.inference.gpu_memory_utilization" in _error({"groups": {"inference": {"gpu_memory_utilization": 1.5}}})
    assert "sft.optim.lr" in _error({"sft": {"optim": {"lr": -1}}})


def test_a_section_for_another_stage_is_refused():
    assert _error({"stage": "sft", "dpo": {"beta": 1.0}}).startswith("dpo: section given but stage is 'sft'")


def test_rlvr_needs_an_inference_group():
    assert "groups.inference.gpus" in _error({"stage": "rlvr"})


def test_model_needs_exactly_one_source():
    assert "model" in _error({"model": {"name_or_path": "x/y", "arch": "llama-3.1-8b"}})
    assert "model.arch" in _error({"model": {"arch": "gpt-5"}})


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides({"groups": {"training": {"tp": 1}}}, ["groups.training.tp=2", "run.name=x y", "cluster.exclusive=true"])
    assert data["groups"]["training"]["tp"] == 2
    assert data["run"]["name"] == "x y"
    assert data["cluster"]["exclusive"] is True


def test_config_error_is_a_value_error_subclass_with_the_key():
    with pytest.raises(SchemaError) as e:
        parse_config({"nope": 1})
    assert e.value.key == "nope"


def test_cli_refuses_tp7_and_unknown_key_with_exit_2(capsys):
    from tulu.cli import main

    assert main(["plan", "configs/tulu3-405b-rlvr.yaml", "--set", "groups.training.tp=7"]) == 2
    assert "groups.training.tp" in capsys.readouterr().err
    assert main(["plan", "configs/tulu3-405b-rlvr.yaml", "--set", "groups.trainingg.tp=2"]) == 2
    assert "groups.trainingg" in capsys.readouterr().err


def test_override_reads_exponent_without_dot_as_a_number():
    from tulu.config.job import apply_overrides

    data = apply_overrides({}, ["sft.optim.lr=1e-4", "run.name=inf", "run.dir=2e5x"])
    assert data["sft"]["optim"]["lr"] == 1e-4
    assert data["run"]["name"] == "inf" and data["run"]["dir"] == "2e5x"


def test_json_config_written_by_a_run_loads_back(tmp_path):
    """A run's config.json (json.dumps writes 1e-08) is a valid config to resubmit."""
    import json

    from tulu.config.job import load_config

    cfg = load_config("configs/tiny-cpu-sft.yaml")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path).to_dict() == cfg.to_dict()


def test_the_monitoring_section_is_the_monitors_own_config_checked_by_key():
    from monitoring.config import MonitorConfig

    cfg = load_config(CONFIGS / "tulu3-405b-rlvr.yaml")
    assert type(cfg.monitoring) is MonitorConfig and cfg.monitoring.max_restarts == 20
    for override, key in [("monitoring.max_restarts=-1", "monitoring.max_restarts"),
                          ("monitoring.safety_factor=0.5", "monitoring.safety_factor"),
                          ("monitoring.phase_timeouts_s.train=0", "monitoring.phase_timeouts_s.train"),
                          ("monitoring.on_storage_fault=later", "monitoring.on_storage_fault")]:
        with pytest.raises(ConfigError) as e:
            load_config(CONFIGS / "tulu3-405b-rlvr.yaml", [override])
        assert e.value.key == key, override
    with pytest.raises(ConfigError, match="moved: set monitoring.max_restarts") as e:
        load_config(CONFIGS / "tiny-cpu-sft.yaml", ["cluster.max_restarts=2"])
    assert e.value.key == "cluster.max_restarts"


def test_spare_nodes_are_checked_and_refused_where_nothing_could_restart_on_them():
    base = CONFIGS / "tiny-cpu-rehearse.yaml"
    assert load_config(base, ["cluster.spare_nodes=1"]).cluster.spare_nodes == 1
    assert load_config(base).cluster.spare_nodes == 0
    with pytest.raises(ConfigError, match=r"cluster.spare_nodes: got -1; allowed: an integer >= 0"):
        load_config(base, ["cluster.spare_nodes=-1"])
    with pytest.raises(ConfigError, match=r"cluster.spare_nodes: got 1; allowed: 0 with cluster.executor 'local'"):
        load_config(CONFIGS / "tiny-cpu-sft.yaml", ["cluster.executor=local", "cluster.spare_nodes=1"])
    with pytest.raises(ConfigError, match=r"cluster.spare_nodes.*monitoring.enabled: false"):
        load_config(base, ["cluster.spare_nodes=1", "monitoring.enabled=false"])
