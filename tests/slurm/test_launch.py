"""Launch through the real local Slurm and real submitit: rehearsal, requeue on time limit,
preemption and `scontrol requeue`, cancel, logs and status."""

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
COUNTER = ["--mode", "counter", "--set", "run.counter_step_s=0.4"]


class Runner:
    def __init__(self, tmp_path: Path):
        self.cwd = tmp_path
        self.env = dict(os.environ, TULU_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))

    def tulu(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*TULU, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"tulu {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def submit(self, config: str, *extra: str) -> str:
        out = self.tulu("submit", str(REPO / "configs" / config), *extra).stdout
        return re.search(r"submitted job (\d+)", out).group(1)

    def state(self, job: str) -> dict:
        out = self.tulu("status", job).stdout
        return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}

    def wait_state(self, job: str, states: set[str], timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        st = {}
        while time.time() < deadline:
            st = self.state(job)
            if st.get("state") in states:
                return st
            time.sleep(1.0)
        logs = self.tulu("logs", job, "-n", "30", check=False).stdout
        raise AssertionError(f"job {job} is {st} after {timeout} s, wanted {states}\n{logs[-6000:]}")

    def counter_state(self, name: str) -> dict:
        return json.loads((self.cwd / "runs" / name / "counter" / "state.json").read_text())

    def wait_counter_step(self, name: str, step: int, timeout: float = 180) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                s = self.counter_state(name)["step"]
                if s >= step:
                    return s
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"counter {name} did not reach step {step} in {timeout} s")


@pytest.fixture
def runner(slurm_cluster, tmp_path):
    return Runner(tmp_path)


def _expected_total(steps: int, world: int = 8) -> int:
    return steps * world * (world + 1) // 2


def test_rehearsal_across_four_nodes_forms_every_group_and_reports(runner):
    job = runner.submit("tiny-cpu-rehearse.yaml")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400)
    assert st["state"] == "COMPLETED", runner.tulu("logs", job, check=False).stdout[-5000:]
    report = json.loads((runner.cwd / "runs" / "tiny-cpu-rehearse" / "rehearsal" / job / "report.json").read_text())
    assert report["ok"] and report["missing_ranks"] == []
    ranks = {r["global_rank"]: r for r in report["ranks"]}
    assert sorted(ranks) == list(range(8))
    assert {r["node"] for r in ranks.values()} == {0, 1, 2, 3}
    # one task per (fake) GPU: Slurm shows each task both of its node's GPUs, each rank takes its own
    assert report["shared_gpus"] == {}
    assert {(r["node"], r["gpu"]) for r in ranks.values()} == {(n, g) for n in range(4) for g in ("0", "1")}
    names = {g["group"] for r in ranks.values() for g in r["groups"]}
    assert {"inference (role world)", "inference engine 0", "training (role world)", "tensor parallel",
            "pipeline parallel", "data parallel", "bridge"} <= names
    bridge = [g for r in ranks.values() for g in r["groups"] if g["group"] == "bridge"]
    assert len(bridge) == 4 and all(g["broadcast_ok"] for g in bridge)
    # Every rank's output is reachable through `tulu logs`, and --group filters by role.
    logs = runner.tulu("logs", job, "-n", "0").stdout
    for r in range(8):
        assert f"[tulu rank {r} " in logs
    training_logs = runner.tulu("logs", job, "--group", "training", "-n", "0").stdout
    assert "[tulu rank 2 " in training_logs and "[tulu rank 0 " not in training_logs
    assert "[tulu rank 5 " in runner.tulu("logs", job, "--rank", "5").stdout


def test_preemption_signal_saves_requeues_and_resumes_from_the_saved_counter(runner, slurm_cluster):
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, "--set", "run.name=preempt", "--set", "run.counter_steps=25")
    runner.wait_counter_step("preempt", 3)
    slurm_cluster.run("scancel", "--signal=USR2", job)  # what a preemption warning (or submitit's test hook) sends
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"})
    assert st["state"] == "COMPLETED"
    assert int(st["restarts"]) == 1
    state = runner.counter_state("preempt")
    assert state["done"] and state["step"] == 25
    assert state["total"] == _expected_total(25)  # no step lost or counted twice
    attempts = state["history"]
    assert [a["attempt"] for a in attempts] == [0, 1]
    assert attempts[1]["resumed_at"] >= 3
    logs = runner.tulu("logs", job, "--rank", "0", "-n", "0").stdout
    assert "stop requested (SIGUSR2)" in logs and f"requeue of job {job} requested" in logs


def test_time_limit_warning_requeues_and_the_job_resumes_from_the_saved_counter(runner):
    # 2-minute limit, warning 60 s before it. Slurm may send the warning up to 60 s early (its
    # event resolution), so it lands 0-60 s into each attempt: 200 steps of 0.4 s never fit in one.
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, "--set", "run.name=timelimit",
                        "--set", "run.counter_steps=200", "--set", "cluster.time_limit_min=2",
                        "--set", "cluster.signal_delay_s=60")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=420)
    assert st["state"] == "COMPLETED", st
    state = runner.counter_state("timelimit")
    assert state["step"] == 200 and state["total"] == _expected_total(200)
    assert len(state["history"]) >= 2 and all(h["resumed_at"] > 0 for h in state["history"][1:])


def test_scontrol_requeue_kills_the_job_and_it_resumes_from_the_last_saved_step(runner, slurm_cluster):
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, "--set", "run.name=requeue", "--set", "run.counter_steps=20")
    saved = runner.wait_counter_step("requeue", 4)
    slurm_cluster.run("scontrol", "requeue", job)
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"})
    assert st["state"] == "COMPLETED" and int(st["restarts"]) == 1
    state = runner.counter_state("requeue")
    assert state["total"] == _expected_total(20)
    assert state["history"][1]["resumed_at"] >= saved


def test_cancelled_job_shows_cancelled(runner):
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, "--set", "run.name=cancel", "--set", "run.counter_steps=500")
    runner.wait_counter_step("cancel", 1)
    runner.tulu("cancel", job)
    st = runner.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    assert st["state"] == "CANCELLED"


def _decisions(runner: Runner, name: str) -> list[dict]:
    path = runner.cwd / "runs" / name / "monitor" / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_crashing_task_is_requeued_then_stops_at_the_restart_budget(runner):
    # Attempt 0: rank 3 raises at step 2. Attempt 1: rank 5 raises at step 4. Budget: 1 requeue.
    faults = "kind=exception,rank=3,step=2,restart=0;kind=exception,rank=5,step=4,restart=1"
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, "--set", "run.name=crash", "--set", "run.counter_steps=40",
                        "--set", "monitoring.max_restarts=1", "--set", f"cluster.env.TULU_FAULT={faults}")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    # The monitor ends the job when it stops the chain (CANCELLED) or srun fails first (FAILED).
    assert st["state"] in ("FAILED", "CANCELLED") and int(st["restarts"]) == 1
    actions = [(d["attempt"], d["action"]) for d in _decisions(runner, "crash") if d["action"] in ("requeue", "stop")]
    assert actions == [(0, "requeue"), (1, "stop")]
    stop = [d for d in _decisions(runner, "crash") if d["action"] == "stop"][0]
    assert "budget" in stop["reason"]
    state = runner.counter_state("crash")
    assert [h["resumed_at"] for h in state["history"]] == [0, 2]
    status = runner.tulu("status", job).stdout
    assert "budget" in status and "rank 5" in status


def test_a_crash_that_recurs_at_the_same_step_stops_the_chain(runner):
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, "--set", "run.name=recur", "--set", "run.counter_steps=40",
                        "--set", "monitoring.max_restarts=5",
                        "--set", "cluster.env.TULU_FAULT=kind=exception,rank=6,step=3,restart=any")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    # The monitor ends the job when it stops the chain (CANCELLED) or srun fails first (FAILED).
    assert st["state"] in ("FAILED", "CANCELLED") and int(st["restarts"]) == 1
    stop = [d for d in _decisions(runner, "recur") if d["action"] == "stop"]
    assert len(stop) == 1 and "same step" in stop[0]["reason"]
