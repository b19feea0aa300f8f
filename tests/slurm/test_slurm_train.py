"""SFT and DPO through the real local Slurm and real submitit (`tulu submit`): the tiny presets
train and improve on held-out data, and a preemption signal mid-run leads to save, requeue and
a resume whose losses equal an uninterrupted run's at every step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TULU = [sys.executable, "-m", "tulu.cli"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


class Runner:
    """`tulu` commands from a fresh folder (the runs land in <tmp>/runs/<name>)."""

    def __init__(self, tmp_path: Path):
        self.cwd = tmp_path
        self.env = dict(os.environ, TULU_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))

    def tulu(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*TULU, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"tulu {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def submit(self, config: str, *sets: str) -> str:
        args = [a for s in sets for a in ("--set", s)]
        out = self.tulu("submit", str(REPO / "configs" / config), *args).stdout
        return re.search(r"submitted job (\d+)", out).group(1)

    def state(self, job: str) -> dict:
        out = self.tulu("status", job).stdout
        return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}

    def wait_done(self, job: str, timeout: float = 420) -> dict:
        deadline = time.time() + timeout
        st: dict = {}
        while time.time() < deadline:
            st = self.state(job)
            if st.get("state") in TERMINAL:
                return st
            time.sleep(1.0)
        raise AssertionError(f"job {job} is {st} after {timeout} s\n{self.logs(job)}")

    def logs(self, job: str, *args: str) -> str:
        return self.tulu("logs", job, "-n", "0", *args, check=False).stdout

    def metrics(self, name: str, kind: str) -> list[dict]:
        path = self.cwd / "runs" / name / "metrics.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["kind"] == kind]

    def wait_step(self, name: str, step: int, timeout: float = 300) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = [r["step"] for r in self.metrics(name, "train")]
            if done and max(done) >= step:
                return max(done)
            time.sleep(0.2)
        raise AssertionError(f"run {name} did not reach step {step} in {timeout} s")


@pytest.fixture
def runner(slurm_cluster, tmp_path):
    return Runner(tmp_path)


def _completed(runner: Runner, job: str, st: dict) -> None:
    assert st["state"] == "COMPLETED", (st, runner.logs(job)[-6000:])


def test_sft_preset_completes_and_lowers_held_out_loss(runner):
    job = runner.submit("tiny-cpu-sft.yaml")
    _completed(runner, job, runner.wait_done(job))
    evals = runner.metrics("tiny-cpu-sft", "eval")
    assert [e["step"] for e in evals] == [0, 60]
    assert evals[-1]["loss"] < evals[0]["loss"] - 2.0, evals  # ~6.3 -> ~1.2 nats per response token
    run = runner.cwd / "runs" / "tiny-cpu-sft"
    assert (run / "checkpoints" / "step_60" / "manifest.json").exists()
    assert (run / "loss_curve.png").stat().st_size > 0
    assert "train step 60: loss" in runner.logs(job, "--rank", "0")


def test_dpo_preset_raises_held_out_preference_accuracy(runner):
    job = runner.submit("tiny-cpu-dpo.yaml")
    _completed(runner, job, runner.wait_done(job))
    start, end = runner.metrics("tiny-cpu-dpo", "eval")
    assert start["step"] == 0 and start["accuracy"] == 0.5  # policy == reference: every pair ties
    assert end["step"] == 40 and end["accuracy"] > 0.7 and end["loss"] < start["loss"], (start, end)


def test_preemption_saves_requeues_and_resumes_with_the_uninterrupted_runs_losses(runner, slurm_cluster):
    steps = ["sft.max_steps=120", "checkpoint.interval=50"]
    straight = runner.submit("tiny-cpu-sft.yaml", "run.name=straight", *steps)
    preempted = runner.submit("tiny-cpu-sft.yaml", "run.name=preempted", *steps)
    at = runner.wait_step("preempted", 10)
    slurm_cluster.run("scancel", "--signal=USR2", preempted)  # a preemption warning
    st = runner.wait_done(preempted)
    _completed(runner, preempted, st)
    assert int(st["restarts"]) == 1
    _completed(runner, straight, runner.wait_done(straight))

    logs = runner.logs(preempted, "--rank", "0")
    stopped = int(re.search(r"stop requested \(SIGUSR2\) at step (\d+); saved", logs).group(1))
    assert at <= stopped < 120
    assert "resumed from" in logs and f"step_{stopped}" in logs
    expected = {r["step"]: r["loss"] for r in runner.metrics("straight", "train")}
    got = {r["step"]: r["loss"] for r in runner.metrics("preempted", "train")}
    assert sorted(got) == sorted(expected) == list(range(1, 121))
    assert got == expected  # bitwise: same seed, same layout, exact resume
