"""bench/bench_grpo_vs_trl.py --task embedded: the prompt files (tulu.data.tasks rows split evenly
over the tasks, held-out capped at what exists, disjoint from training) and the TRL side's reward
path to tulu's verifiers (bench/trl_grpo_side.py's helper; no TRL needed)."""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from tulu.data.tasks import VERIFIERS, problems, task_rows

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_grpo_vs_trl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_embedded_prompts_split_evenly_disjoint_and_capped(bench, tmp_path):
    # denominators 2..3 leave a few dozen distinct held-out math prompts (24 today): asked 30, capped
    difficulty = {"gsm8k": {"max_operand": 10}, "math": {"max_denominator": 3}}
    train, held, info = bench.make_task_prompts(tmp_path, train_size=31, eval_size=90, seed=5,
                                                names=["gsm8k", "math", "ifeval"], difficulty=difficulty)
    train_rows, held_rows = _rows(train), _rows(held)
    assert info["train_per_task"] == {"gsm8k": 11, "math": 10, "ifeval": 10}
    assert Counter(r["dataset"] for r in train_rows) == {VERIFIERS["gsm8k"]: 11, VERIFIERS["math"]: 10,
                                                         VERIFIERS["ifeval"]: 10}
    capped = info["heldout_capped"]
    assert list(capped) == ["math"] and capped["math"]["asked"] == 30
    found = capped["math"]["distinct_heldout_prompts"]
    assert 0 < found < 30
    assert info["heldout_per_task"] == {"gsm8k": 30, "math": found, "ifeval": 30}
    assert len(held_rows) == 60 + found
    # the held-out rows are the held-out split's (the same draws as task_rows), distinct, and
    # never a training prompt
    prompts = [r["messages"][0]["content"] for r in held_rows]
    assert len(set(prompts)) == len(prompts)
    assert not set(prompts) & {r["messages"][0]["content"] for r in train_rows}
    expected = task_rows("math", "heldout", found, 5, difficulty=difficulty)
    assert sorted(map(json.dumps, expected)) == sorted(json.dumps(r) for r in held_rows
                                                       if r["dataset"] == VERIFIERS["math"])
    # the same arguments give the same files
    (tmp_path / "again").mkdir()
    again = bench.make_task_prompts(tmp_path / "again", 31, 90, 5, ["gsm8k", "math", "ifeval"], difficulty)
    assert again[0].read_bytes() == train.read_bytes() and again[1].read_bytes() == held.read_bytes()


def test_embedded_reads_the_config_and_needs_a_start_model(bench, monkeypatch):
    from tulu.pipeline.config import load_pipeline

    settings = bench.embedded_settings()
    assert settings.tasks.difficulty() == load_pipeline(str(REPO / "configs/tiny-cpu.yaml")).settings.tasks.difficulty()
    monkeypatch.setattr(sys, "argv", ["bench_grpo_vs_trl.py", "--task", "embedded", "--sides", "ours"])
    with pytest.raises(SystemExit, match="needs --start-model"):
        bench.main()


def test_trl_side_scores_each_row_by_its_dataset_with_tulus_verifiers():
    trl_side = _load("trl_grpo_side")
    reward = trl_side.TuluVerifiers(sys.executable, str(REPO), 1, 10.0, sorted(VERIFIERS.values()))
    try:
        completions, ground_truth, dataset, expected = [], [], [], []
        for task, verifier in VERIFIERS.items():
            p = problems(task, "train", 1, seed=0)[0]
            for text, ok in ((p.answer, 1.0), ("no answer here", 0.0)):
                completions.append([{"role": "assistant", "content": text}])
                ground_truth.append(p.ground_truth)
                dataset.append(verifier)
                expected.append(ok)
        assert reward(completions, ground_truth, dataset, trainer_state=None) == expected
    finally:
        stats = reward.close()
    assert stats["rows"] == 6 and stats["verified"] == 3 and stats["errors"] == 0


def test_gain_comparison_pairs_prompts_over_repeats(bench):
    # two seeds, three prompts each: ours right where TRL is wrong on 2 of 6 pairs, wrong where it is
    # right on 1 -> mean +1/6; the SE is the per-prompt difference's sd / sqrt(6)
    ours = [{"a": 1, "b": 1, "c": 0}, {"a": 1, "b": 0, "c": 0}]
    trl = [{"a": 1, "b": 0, "c": 1}, {"a": 0, "b": 0, "c": 0}]
    out = bench.gain_comparison(ours, trl)
    diffs = [0, 1, -1, 1, 0, 0]
    mean = sum(diffs) / 6
    sd = (sum((d - mean) ** 2 for d in diffs) / 5) ** 0.5
    assert out == {"gain_paired_n": 6, "gain_ours_minus_trl_mean": round(mean, 4),
                   "gain_ours_minus_trl_se": round(sd / 6 ** 0.5, 4)}
    # a prompt one side never saw is not paired; one pair is no sample
    assert bench.gain_comparison([{"a": 1, "z": 1}], [{"a": 0}]) == {}
