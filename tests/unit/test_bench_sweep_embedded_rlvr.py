"""bench/sweep_embedded_rlvr.py: where a word problem's answer goes wrong, step by step; the
training reward read back per task; the sweep folder holds only the copied data and DPO model,
with ``--rlvr-tasks`` keeping only those tasks' RLVR prompts."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_embedded_rlvr", REPO / "bench" / "sweep_embedded_rlvr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample(completion: str, verified: bool, task: str = "gsm8k") -> dict:
    return {"task": task, "completion": completion, "verified": verified}


def test_word_problem_steps_counts_each_step(sweep):
    samples = [
        _sample("2*3=6. 6-4=2. The answer is 2.", True),      # all right
        _sample("6+4=10. 10+4=12. The answer is 13.", False),  # second fact and answer wrong
        _sample("7-3=3. 4-1=3. The answer is 3.", False),      # first fact wrong, carried wrong
        _sample("8-7=1. 1+6=3. The answer is 7.", True),       # right by luck: answer is not the result
        _sample("2+5=7. The answer is 7.", False),             # stopped a step early: no chain
        _sample("\\boxed{\\frac{1}{2}}", True, task="math"),   # other tasks are not counted
    ]
    got = sweep.word_problem_steps(samples)
    assert got == {"n": 5, "verified": 2, "chains": 4, "first_fact": 3, "second_fact": 2,
                   "carried": 3, "answer_is_result": 2}


def test_training_reward_first_and_last_window(sweep, tmp_path):
    rows = [{"kind": "train", "step": s, "verified_gsm8k": 0.0 if s <= 2 else 1.0, "verified_all": 0.5}
            for s in range(1, 6)]
    rows.insert(2, {"kind": "eval", "step": 2, "verified_gsm8k": 0.25})  # not a training step
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep.training_reward(path, window=2) == {"all": [0.5, 0.5], "gsm8k": [0.0, 1.0]}


def test_prepare_copies_data_and_dpo_only_and_filters_tasks(sweep, tmp_path):
    run = tmp_path / "s1"
    (run / "data").mkdir(parents=True)
    (run / "dpo" / "checkpoints" / "step_16").mkdir(parents=True)
    (run / "dpo" / "checkpoints" / "step_16" / "model.pt").write_bytes(b"weights")
    (run / "sft").mkdir()
    rows = [{"dataset": d, "messages": [], "ground_truth": "1"} for d in ("gsm8k", "MATH", "gsm8k", "ifeval")]
    (run / "data" / "rlvr_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "s1-try"
    (folder / "rlvr").mkdir(parents=True)  # an earlier try's folder is replaced whole
    (folder / "rlvr" / "stale").write_text("x")
    sweep.prepare(run, folder, ["gsm8k"])
    assert sorted(p.name for p in folder.iterdir()) == ["data", "dpo"]
    assert (folder / "dpo" / "checkpoints" / "step_16" / "model.pt").read_bytes() == b"weights"
    kept = [json.loads(x)["dataset"] for x in (folder / "data" / "rlvr_train.jsonl").read_text().splitlines()]
    assert kept == ["gsm8k", "gsm8k"]
    assert len((run / "data" / "rlvr_train.jsonl").read_text().splitlines()) == 4  # the run is left alone
    with pytest.raises(SystemExit, match="no such RLVR prompts"):
        sweep.prepare(run, folder, ["code"])
    (folder / "notes.txt").write_text("mine")  # a folder with what the sweep never writes is refused
    with pytest.raises(SystemExit, match="notes.txt"):
        sweep.prepare(run, folder, None)
    assert (folder / "notes.txt").read_text() == "mine"
