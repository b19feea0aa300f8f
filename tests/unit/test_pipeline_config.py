"""The pipeline config: every stage job validated before anything is submitted, errors name the
YAML path, and each stage starts from the previous stage's checkpoint."""

from pathlib import Path

import pytest

from tulu.config.schema import ConfigError
from tulu.pipeline.config import load_pipeline, parse_pipeline
from tulu.pipeline.driver import build_steps, choose_executor, plan_stages

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-cpu.yaml"


def test_embedded_default_chains_stages_through_checkpoints(tmp_path):
    p = load_pipeline(TINY, [f"pipeline.dir={tmp_path}/{{name}}"])
    assert list(p.jobs) == ["sft", "dpo", "rlvr"]
    root = tmp_path / "tiny-cpu"
    sft, dpo, rlvr = p.jobs["sft"], p.jobs["dpo"], p.jobs["rlvr"]
    assert sft.model.init_from is None and sft.model.tiny is not None
    assert dpo.model.init_from == str(root / "sft" / "checkpoints")
    assert rlvr.model.init_from == str(root / "dpo" / "checkpoints")
    assert sft.data.train == str(root / "data" / "sft.jsonl")
    assert dpo.data.train == str(root / "data" / "dpo_pairs.jsonl")
    assert rlvr.data.eval == str(root / "data" / "heldout.jsonl")
    assert {c.run.seed for c in p.jobs.values()} == {p.settings.seed}
    assert [s.name for s in build_steps(p)] == ["sft", "pairs", "dpo", "rlvr", "eval"]


def test_skipping_dpo_starts_rlvr_from_sft(tmp_path):
    p = load_pipeline(TINY, [f"pipeline.dir={tmp_path}", "pipeline.stages=[sft, rlvr]"])
    assert p.jobs["rlvr"].model.init_from == str(tmp_path / "sft" / "checkpoints")
    assert "pairs" not in [s.name for s in build_steps(p)]


@pytest.mark.parametrize("override, key", [
    ("stages.dpo.dpo.beta=-1", "stages.dpo.dpo.beta"),
    ("stages.rlvr.rlvr.bogus=1", "stages.rlvr.rlvr.bogus"),
    ("stages.sft.groups.training.tp=3", "stages.sft.groups.training.tp"),
    ("pipeline.tasks.names=[gsm8k, chess]", "pipeline.tasks.names"),
    ("pipeline.stages=[rlvr, sft]", "pipeline.stages"),
    ("pipeline.pairs.samples_per_prompt=1", "pipeline.pairs.samples_per_prompt"),
    ("pipeline.executor=ray", "pipeline.executor"),
    ("pipeline.tasks.gsm8k_max_operand=3", "pipeline.tasks.gsm8k_max_operand"),
    ("pipeline.tasks.gsm8k_max_operand=100", "pipeline.tasks.gsm8k_max_operand"),
    ("pipeline.tasks.math_max_denominator=2", "pipeline.tasks.math_max_denominator"),
    ("pipeline.tasks.gsm8k_steps=3", "pipeline.tasks.gsm8k_steps"),
    ("pipeline.tasks.math_max_denominator=21", "pipeline.tasks.math_max_denominator"),
    ("pipeline.tasks.sft_slip=1.0", "pipeline.tasks.sft_slip"),
    ("pipeline.tasks.sft_slip=-0.1", "pipeline.tasks.sft_slip"),
])
def test_bad_values_name_the_yaml_path(override, key):
    with pytest.raises(ConfigError) as e:
        plan_stages(load_pipeline(TINY, [override]))  # what `tulu pipeline` does before submitting
    assert e.value.key == key, str(e.value)


def test_unknown_sections_are_refused():
    with pytest.raises(ConfigError, match="valid top-level keys"):
        parse_pipeline({"pipeline": {}, "stage": {}})
    with pytest.raises(ConfigError, match="stages.ppo"):
        parse_pipeline({"pipeline": {"stages": ["sft"]}, "stages": {"ppo": {}}})


def test_local_executor_refuses_multi_node_stage_before_submitting(tmp_path):
    p = load_pipeline(TINY, [f"pipeline.dir={tmp_path}", "pipeline.executor=local", "defaults.cluster.nodes=2"])
    with pytest.raises(ConfigError) as e:
        choose_executor(p)
    assert e.value.key == "stages.sft.cluster.nodes"
    assert not tmp_path.joinpath("data").exists()


def test_task_difficulty_reaches_the_generated_data(tmp_path):
    from tulu.pipeline.steps import write_data

    assert load_pipeline(TINY).settings.tasks.difficulty()["gsm8k"]["steps"] == 2  # the embedded default
    p = load_pipeline(TINY, [f"pipeline.dir={tmp_path}", "pipeline.tasks.gsm8k_max_operand=6",
                             "pipeline.tasks.math_max_denominator=4", "pipeline.tasks.sft_per_task=40",
                             "pipeline.tasks.train_per_task=40", "pipeline.tasks.heldout_per_task=5",
                             "pipeline.tasks.gsm8k_steps=1"])
    assert p.settings.tasks.difficulty() == {"gsm8k": {"max_operand": 6}, "math": {"max_denominator": 4}}
    files = write_data(tmp_path / "data", p.settings)
    import json
    rows = [json.loads(line) for line in files["rlvr_train"].read_text().splitlines()]
    gsm = [int(r["ground_truth"]) for r in rows if r["dataset"] == "gsm8k"]
    assert gsm and max(gsm) <= 5 * 3   # sums <= 12, differences < 9, products <= 5 x 3
    card = json.loads((tmp_path / "data" / "card.json").read_text())
    assert card["pipeline"]["difficulty"]["math"] == {"max_denominator": 4}


def test_careless_sft_answers_reach_the_data_and_its_card(tmp_path):
    """The embedded default's SFT set holds the share of careless answers it asks for (that the
    verifiers reject each is tests/unit/test_tasks.py's); the RLVR and held-out files do not change."""
    import json

    from tulu.pipeline.steps import write_data

    small = [f"pipeline.dir={tmp_path}", "pipeline.tasks.sft_per_task=400", "pipeline.tasks.train_per_task=20",
             "pipeline.tasks.heldout_per_task=5"]
    p = load_pipeline(TINY, small)
    slip = p.settings.tasks.sft_slip
    assert 0 < slip < 0.5, "the embedded default's teacher is careless less often than not"
    files = write_data(tmp_path / "a", p.settings)
    clean = write_data(tmp_path / "b", load_pipeline(TINY, [*small, "pipeline.tasks.sft_slip=0"]).settings)
    for name in ("rlvr_train", "heldout"):
        assert files[name].read_bytes() == clean[name].read_bytes(), name
    rows = [json.loads(line) for line in files["sft"].read_text().splitlines()]
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert card["sft_slip"] == slip and card["pipeline"]["sft_slip"] == slip
    clean_rows = [json.loads(line) for line in clean["sft"].read_text().splitlines()]
    assert [r["messages"][0] for r in rows] == [r["messages"][0] for r in clean_rows]
    changed = sum(a != b for a, b in zip(rows, clean_rows))
    assert abs(changed / len(rows) - slip) < 0.05


@pytest.mark.parametrize("names, count, key, asked", [
    ("[math]", "100", "pipeline.tasks.heldout_per_task", 100),
    ("[math, gsm8k]", "{math: 64, gsm8k: 3}", "pipeline.tasks.heldout_per_task.math", 64),
])
def test_more_held_out_prompts_than_the_difficulty_has_are_refused_by_key(tmp_path, names, count, key, asked):
    from tulu.pipeline.steps import check_heldout, write_data

    p = load_pipeline(TINY, [f"pipeline.dir={tmp_path}", "pipeline.tasks.math_max_denominator=5",
                             f"pipeline.tasks.names={names}", "pipeline.tasks.sft_per_task=10",
                             "pipeline.tasks.train_per_task=10", "pipeline.tasks.heldout_per_task=1",
                             f"pipeline.tasks.heldout_per_task={count}"])
    for refuse in (lambda: check_heldout(p.settings), lambda: write_data(tmp_path / "data", p.settings)):
        with pytest.raises(ConfigError) as err:
            refuse()
        assert err.value.key == key
        assert f"got {asked}; only 63 distinct held-out math prompts" in str(err.value)
        assert "ask for at most 63" in str(err.value)
    assert not (tmp_path / "data" / "heldout.jsonl").exists()



def test_held_out_prompts_per_task_as_a_mapping(tmp_path):
    import json

    from tulu.pipeline.steps import write_data

    counts = {"gsm8k": 7, "math": 5, "ifeval": 6}
    p = load_pipeline(TINY, [f"pipeline.dir={tmp_path}", "pipeline.tasks.sft_per_task=10",
                             "pipeline.tasks.train_per_task=10",
                             "pipeline.tasks.heldout_per_task={gsm8k: 7, math: 5, ifeval: 6}"])
    assert p.settings.tasks.heldout_counts() == counts
    files = write_data(tmp_path / "data", p.settings)
    rows = [json.loads(line) for line in files["heldout"].read_text().splitlines()]
    by_verifier = {"gsm8k": "gsm8k", "math": "MATH", "ifeval": "ifeval"}
    assert {t: sum(r["dataset"] == v for r in rows) for t, v in by_verifier.items()} == counts
    card = json.loads((tmp_path / "data" / "card.json").read_text())
    assert {t: c["heldout"] for t, c in card["tasks"].items()} == counts
    # the first prompts of a task are those of a smaller count: a larger set extends the same draws
    one = load_pipeline(TINY, [f"pipeline.dir={tmp_path}", "pipeline.tasks.sft_per_task=10",
                               "pipeline.tasks.train_per_task=10", "pipeline.tasks.heldout_per_task=5"])
    small = [json.loads(x) for x in write_data(tmp_path / "small", one.settings)["heldout"].read_text().splitlines()]
    assert {r["messages"][0]["content"] for r in small} <= {r["messages"][0]["content"] for r in rows}


@pytest.mark.parametrize("value, key, says", [
    ("{gsm8k: 7, math: 5}", "pipeline.tasks.heldout_per_task", "ifeval has none"),
    ("{gsm8k: 7, math: 5, ifeval: 6, gsm8: 3}", "pipeline.tasks.heldout_per_task.gsm8", "gsm8k, math, ifeval"),
    ("{gsm8k: 0, math: 5, ifeval: 6}", "pipeline.tasks.heldout_per_task.gsm8k", "an integer >= 1"),
    ("{gsm8k: many, math: 5, ifeval: 6}", "pipeline.tasks.heldout_per_task", "a mapping of a string to an integer"),
])
def test_a_wrong_held_out_mapping_names_the_key_and_what_is_allowed(value, key, says):
    # from a config whose count is one number (a --set mapping merges into a mapping already there)
    with pytest.raises(ConfigError) as err:
        load_pipeline(TINY, ["pipeline.tasks.heldout_per_task=100", f"pipeline.tasks.heldout_per_task={value}"])
    assert err.value.key == key and says in str(err.value)


def test_fewer_task_names_keep_the_default_held_out_mapping_valid():
    p = load_pipeline(TINY, ["pipeline.tasks.names=[gsm8k]"])
    assert p.settings.tasks.heldout_counts() == {"gsm8k": 300}
