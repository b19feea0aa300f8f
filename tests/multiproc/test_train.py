"""SFT and DPO training in real gloo process groups, through the same `tulu.modes.train.run(ctx)`
a Slurm task calls: every TP/PP/DP layout computes the same losses, an interrupted run resumes
bit for bit, a checkpoint of another architecture is refused by name, SFT lowers held-out loss
and DPO raises held-out preference accuracy."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import DistributedTestError, job_task, random_job_id, run_distributed  # noqa: E402

pytestmark = pytest.mark.multiproc

LAYOUT_RTOL = 1e-5  # TP/PP change the order of float sums: fp32 rounding only


def tiny_config(stage: str, run_dir: Path, *, tp=1, pp=1, dp=1, steps=4, **overrides) -> dict:
    """A 2-layer, hidden-32 Llama on synthetic arithmetic; `overrides` are dotted keys."""
    d = {
        "stage": stage, "mode": "train",
        "cluster": {"executor": "local", "nodes": 1, "gpus_per_node": tp * pp * dp},
        "groups": {"training": {"tp": tp, "pp": pp, "dp": dp, "distributed_optimizer": False,
                                "micro_batch_size": 4}},
        "model": {"dtype": "fp32", "tiny": {"vocab_size": 264, "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 2, "num_attention_heads": 4,
                                            "num_key_value_heads": 2, "max_position_embeddings": 64}},
        stage: {"optim": {"lr": 3.0e-3, "warmup_ratio": 0.1}, "max_steps": steps, "global_batch_size": 8,
                "max_seq_len": 64},
        "data": {"synthetic": "arithmetic_sft" if stage == "sft" else "arithmetic_preference",
                 "synthetic_size": 256},
        "checkpoint": {"interval": 100, "keep_last": 2},
        "monitoring": {"enabled": False},
        "run": {"name": "test", "dir": str(run_dir), "seed": 7},
    }
    for key, value in overrides.items():
        node = d
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return d


def train(cfg: dict, stop_after_steps: int | None = None, timeout: float = 300) -> list[dict]:
    g = cfg["groups"]["training"]
    world = g["tp"] * g["pp"] * g["dp"]
    return run_distributed(job_task, world, cfg, random_job_id(), stop_after_steps,
                           init_process_group=False, timeout=timeout)


def metrics(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir, "train")}


# --- layouts ---------------------------------------------------------------------------------------

LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2), "tp2_pp2": dict(tp=2, pp=2), "dp2": dict(dp=2)}


@pytest.fixture(scope="module")
def tp1_losses(tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("tp1")
    train(tiny_config("sft", run_dir, steps=3))
    return losses(run_dir)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_computes_the_tp1_losses(layout, tp1_losses, tmp_path):
    train(tiny_config("sft", tmp_path, steps=3, **LAYOUTS[layout]))
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3]
    for step, loss in tp1_losses.items():  # step 1: same batch, same weights; 2-3: after updates
        assert got[step] == pytest.approx(loss, rel=LAYOUT_RTOL), (layout, step, got, tp1_losses)
    if layout == "dp2":  # the same sums in the same order: identical
        assert got == tp1_losses


# --- resume ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config("sft", run_dir, dp=2, steps=8))
    return run_dir


def test_interrupted_and_resumed_run_reproduces_every_later_loss_exactly(uninterrupted, tmp_path):
    cfg = tiny_config("sft", tmp_path, dp=2, steps=8)
    first = train(cfg, stop_after_steps=3)
    assert [r["stopped_at"] for r in first] == [3, 3]
    assert (tmp_path / "checkpoints" / "step_3" / "manifest.json").exists()
    second = train(cfg)
    assert [r["start_step"] for r in second] == [3, 3] and second[0]["step"] == 8
    expected, got = losses(uninterrupted), losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bitwise on CPU: weights, Adam state, LR step, data position, RNG
    assert metrics(tmp_path, "eval")[-1]["loss"] == metrics(uninterrupted, "eval")[-1]["loss"]


def test_sft_lowers_held_out_loss(uninterrupted):
    evals = metrics(uninterrupted, "eval")
    assert [e["step"] for e in evals] == [0, 8]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5, evals
    assert (uninterrupted / "loss_curve.png").stat().st_size > 0


def test_checkpoint_of_another_architecture_is_refused_naming_the_mismatch(uninterrupted, tmp_path):
    cfg = tiny_config("sft", tmp_path, dp=2, steps=8, **{"model.tiny.hidden_size": 48,
                                                        "checkpoint.dir": str(uninterrupted / "checkpoints")})
    with pytest.raises(DistributedTestError) as err:
        train(cfg)
    text = str(err.value)
    assert "IncompatibleCheckpointError" in text and "model.tiny.hidden_size" in text
    assert "checkpoint has 32, this run has 48" in text


# --- DPO -------------------------------------------------------------------------------------------

def _preference_rows(n: int, seed: int) -> list[dict]:
    """Pairs a tiny model can learn to rank from preferences alone: a worked answer is
    preferred to a refusal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        user = {"role": "user", "content": f"What is {a}+{b}?"}
        rows.append({"chosen": [user, {"role": "assistant", "content": f"{a}+{b}={a + b}. The answer is {a + b}."}],
                     "rejected": [user, {"role": "assistant", "content": "I cannot say."}]})
    return rows


def _write(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("prefs")
    return {"data.train": _write(_preference_rows(256, 0), d / "train.jsonl"),
            "data.eval": _write(_preference_rows(64, 1), d / "eval.jsonl"), "data.synthetic": None}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, preference_files) -> Path:
    run_dir = tmp_path_factory.mktemp("dpo")
    train(tiny_config("dpo", run_dir, dp=2, steps=10, **preference_files,
                      **{"dpo.beta": 0.5, "dpo.optim.lr": 1.0e-3}))
    return run_dir


def test_dpo_raises_held_out_preference_accuracy(dpo_run):
    start, end = metrics(dpo_run, "eval")
    assert start["accuracy"] == 0.5 and start["margin"] == 0.0  # the policy is the reference: all ties
    assert end["accuracy"] > 0.9 and end["margin"] > 0 and end["loss"] < start["loss"], (start, end)
    train_rows = metrics(dpo_run, "train")
    assert {"chosen_reward", "rejected_reward", "margin", "accuracy", "grad_norm", "lr",
            "tokens_per_s"} <= set(train_rows[0])


def test_precomputed_reference_logprobs_give_the_frozen_models_losses(dpo_run, preference_files, tmp_path):
    train(tiny_config("dpo", tmp_path, dp=2, steps=10, **preference_files,
                      **{"dpo.beta": 0.5, "dpo.optim.lr": 1.0e-3, "dpo.reference_logprobs": "precomputed"}))
    expected, got = losses(dpo_run), losses(tmp_path)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
