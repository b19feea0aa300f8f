"""RLVR with PPO through the real local Slurm: a transformers-engine inference rank and a
Megatron-core training rank holding the policy, the frozen reference and the value model; a
preemption in the middle resumes from a checkpoint that holds the policy and the value model.

The value metrics (value loss, explained variance, value clip fraction) come from the value
model's own optimizer step; `sampler_kl` near zero shows the engine generated with the
trainer's weights, also on the first step after the resume.
"""

from __future__ import annotations

import json
import time

import pytest

from test_launch import Runner

VALUE_METRICS = ("value_loss", "explained_variance", "value_clip_frac", "value_grad_norm", "returns_mean",
                 "non_score_reward")


@pytest.fixture
def runner(slurm_cluster, tmp_path):
    return Runner(tmp_path)


def _metrics(runner: Runner, name: str) -> list[dict]:
    path = runner.cwd / "runs" / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ppo_with_value_model_resumes_after_preemption_from_a_checkpoint_holding_both(runner, slurm_cluster):
    job = runner.submit("tiny-cpu-rlvr.yaml", "--set", "run.name=ppo", "--set", "rlvr.steps=5",
                        "--set", "checkpoint.interval=2", "--set", "groups.inference.engine=transformers",
                        "--set", "rlvr.algorithm=ppo", "--set", "rlvr.samples_per_prompt=1",
                        "--set", "rlvr.value_lr=3.0e-4")
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 2 for r in _metrics(runner, "ppo")):
        time.sleep(0.5)
    assert any(r["step"] >= 2 for r in _metrics(runner, "ppo")), runner.tulu("logs", job, check=False).stdout[-4000:]
    slurm_cluster.run("scancel", "--signal=USR2", job)
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400)
    assert st["state"] == "COMPLETED", runner.tulu("logs", job, check=False).stdout[-4000:]
    assert int(st["restarts"]) == 1
    rows = [r for r in _metrics(runner, "ppo") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert all(k in r for k in VALUE_METRICS), sorted(r)
        assert r["value_loss"] >= 0 and 0.0 <= r["value_clip_frac"] <= 1.0 and r["explained_variance"] <= 1.0
        assert abs(r["sampler_kl"]) < 1e-3, r  # the engine generated with the trainer's weights
        assert r["response_tokens"] > 0 and r["weight_sync_bytes"] > 0
    logs = runner.tulu("logs", job, "--group", "training", "-n", "0").stdout
    assert "rlvr ppo:" in logs
    assert "(policy, value model and their optimizers)" in logs and "the inference group gets these weights" in logs
    ckpts = sorted(p.name for p in (runner.cwd / "runs" / "ppo" / "checkpoints").glob("step_*"))
    assert "step_5" in ckpts and not any(p.endswith(".tmp") for p in ckpts)
    manifest = json.loads((runner.cwd / "runs" / "ppo" / "checkpoints" / "step_5" / "manifest.json").read_text())
    assert manifest["config_fingerprint"]["rlvr.algorithm"] == "ppo"
