"""`tulu pipeline` without Slurm: submitit's local executor runs the steps one after another and
the accuracy table still comes out (SFT only, to keep it short; the full chain runs on Slurm in
tests/slurm/test_pipeline.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_local_executor_runs_steps_in_turn_and_prints_the_table(tmp_path):
    sets = ["pipeline.executor=local", "pipeline.stages=[sft]", f"pipeline.dir={tmp_path}/{{name}}",
            "pipeline.tasks.sft_per_task=100", "pipeline.tasks.train_per_task=16", "pipeline.tasks.heldout_per_task=4",
            "pipeline.eval.max_new_tokens=16", "stages.sft.sft.max_steps=4", "defaults.checkpoint.interval=2"]
    env = dict(os.environ, TULU_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "tulu.cli", "pipeline", str(REPO / "configs" / "tiny-cpu.yaml"),
                        *[x for kv in sets for x in ("--set", kv)]], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(local executor)" in r.stdout
    root = tmp_path / "tiny-cpu"
    record = json.loads((root / "pipeline.json").read_text())
    assert [s["step"] for s in record["steps"]] == ["sft", "eval"] and record["executor"] == "local"
    results = json.loads((root / "eval" / "accuracy.json").read_text())
    results = results.get("results", results)
    assert list(results) == ["untrained", "sft"] and results["sft"]["n"] == results["untrained"]["n"] == 12
    assert "sft" in r.stdout and "all (n=12)" in r.stdout
    assert (root / "sft" / "hf" / "config.json").exists()
    # each rank runs as a Slurm task would: cluster.cpus_per_task threads (1), not all the cores
    starts = [line for f in (root / "sft" / "logs").glob("*/*_log.out") for line in f.read_text().splitlines()
              if "mode train, role training" in line]
    assert len(starts) == 2 and all(line.endswith(", 1 threads") for line in starts), starts
    # and with glibc's allocator set for a CPU task (tulu.launch.host_memory), said in its log
    logs = [f.read_text() for f in (root / "sft" / "logs").glob("*/*_log.out")]
    assert len(logs) == 2 and all("malloc: mmap_threshold 32 MiB, trim_threshold 256 MiB" in log for log in logs)
