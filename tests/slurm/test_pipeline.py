"""`tulu pipeline` through the real local Slurm: SFT -> pairs -> DPO -> RLVR -> eval as chained
jobs (afterok), a SIGKILLed RLVR rank in the middle, and the final accuracy table anyway."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import read_env_sh, slurm_home
from test_launch import REPO, TULU

SMALL = [
    "pipeline.tasks.sft_per_task=200", "pipeline.tasks.train_per_task=64", "pipeline.tasks.heldout_per_task=8",
    "pipeline.pairs.prompts_per_task=8", "pipeline.pairs.max_new_tokens=24", "pipeline.eval.max_new_tokens=24",
    "stages.sft.sft.max_steps=12", "stages.dpo.dpo.max_steps=4", "stages.dpo.dpo.global_batch_size=8",
    "stages.dpo.groups.training.micro_batch_size=4",
    "stages.rlvr.rlvr.steps=8", "stages.rlvr.rlvr.prompts_per_step=4", "stages.rlvr.rlvr.response_length=24",
    "stages.rlvr.groups.training.micro_batch_size=16", "defaults.checkpoint.interval=2",
]


def _pipeline(tmp_path: Path, *extra: str) -> subprocess.Popen:
    sets = [x for kv in (*SMALL, f"pipeline.dir={tmp_path}/runs/{{name}}", *extra) for x in ("--set", kv)]
    env = dict(os.environ, TULU_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    return subprocess.Popen([*TULU, "pipeline", str(REPO / "configs" / "tiny-cpu.yaml"), *sets], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if r.get("kind") == "train"]


def _training_rank(run_dir: Path) -> dict | None:
    for meta in sorted((run_dir / "monitor" / "progress").glob("rank_*.json")):
        info = json.loads(meta.read_text())
        if info.get("role") == "training":
            return info
    return None


def _kill_rank(info: dict) -> None:
    """SIGKILL a rank by its record. Its pid is its node's: on isolated nodes (own PID namespace)
    the kill runs inside that node, where the number means that rank."""
    if read_env_sh(slurm_home() / "env.sh").get("TULU_SLURM_ISOLATED") == "1":
        slurmd = (slurm_home() / "run" / f"slurmd-{info['node']}.pid").read_text().strip()
        subprocess.run(["nsenter", "-t", slurmd, "-p", "-m", "kill", "-KILL", str(info["pid"])], check=True)
    else:
        os.kill(info["pid"], signal.SIGKILL)


def test_pipeline_chains_stage_jobs_and_finishes_after_rlvr_rank_is_killed(slurm_cluster, tmp_path):
    proc = _pipeline(tmp_path)
    root = tmp_path / "runs" / "tiny-cpu"
    rlvr = root / "rlvr"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and max(_train_steps(rlvr / "metrics.jsonl"), default=0) < 3:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-5000:]
    rank = _training_rank(rlvr)
    assert rank, "no training rank record"
    _kill_rank(rank)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]

    record = json.loads((root / "pipeline.json").read_text())
    jobs = {s["step"]: s["job_id"] for s in record["steps"]}
    assert list(jobs) == ["sft", "pairs", "dpo", "rlvr", "eval"]
    acct = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID,JobName,State",
                             "-j", ",".join(jobs.values())).stdout
    states = {line.split("|")[0]: line.split("|")[2] for line in acct.splitlines() if line.strip()}
    assert all(states.get(j) == "COMPLETED" for j in jobs.values()), acct
    attempts = slurm_cluster.run("sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", jobs["rlvr"]).stdout
    assert len(attempts.split()) >= 2, f"the RLVR job was not requeued after the kill:\n{attempts}"
    assert sorted(set(_train_steps(rlvr / "metrics.jsonl"))) == list(range(1, 9))

    acc = json.loads((root / "eval" / "accuracy.json").read_text())
    results = acc.get("results", acc)
    assert list(results) == ["untrained", "sft", "dpo", "rlvr"]
    for stage in results.values():
        assert set(stage["per_task"]) == {"gsm8k", "math", "ifeval"}
        assert stage["n"] == 24
    assert (root / "eval" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rlvr" in out and "gsm8k" in out and "ifeval" in out  # the table is printed
    pairs = [json.loads(x) for x in (root / "data" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"][0] == p["rejected"][0] for p in pairs)


def test_failed_stage_stops_the_chain_and_names_its_log(slurm_cluster, tmp_path):
    proc = _pipeline(tmp_path, "stages.sft.monitoring.max_restarts=0",
                     "stages.sft.cluster.env={TULU_FAULT: 'kind=exception,rank=0,step=2,restart=any'}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-4000:]
    assert re.search(r"pipeline stopped: sft \(job \d+\) ended (FAILED|CANCELLED)", out), out[-4000:]
    assert re.search(r"log: \S+_log\.(err|out)", out) and "InjectedFault" in out, out[-4000:]
    record = json.loads((tmp_path / "runs" / "tiny-cpu" / "pipeline.json").read_text())
    later = [s["job_id"] for s in record["steps"][1:]]
    deadline = time.time() + 60
    while time.time() < deadline:
        acct = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(later)).stdout
        states = [line.split("|")[1] for line in acct.splitlines() if line.strip()]
        if len(states) == len(later) and all(s.startswith("CANCELLED") for s in states):
            break
        time.sleep(1)
    assert all(s.startswith("CANCELLED") for s in states) and len(states) == len(later), acct
    assert not (tmp_path / "runs" / "tiny-cpu" / "eval" / "accuracy.json").exists()
