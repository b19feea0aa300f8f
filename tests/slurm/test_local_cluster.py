"""The local Slurm cluster (slurm/local/start.sh) keeps the promises the rest of
the suite relies on: 4 nodes with fake GPUs, real multi-node srun, fast requeue,
sacct accounting, and an idempotent start."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

START = Path(__file__).resolve().parents[2] / "slurm" / "local" / "start.sh"
NODES = 4  # the shape conftest's slurm_cluster guarantees (start.sh defaults)
GPUS_PER_NODE = 2
UP_STATES = {"idle", "mixed", "allocated", "completing"}


def test_four_nodes_are_idle_with_fake_gpus(slurm_cluster):
    states = slurm_cluster.node_states()
    assert sorted(states) == [f"n{i}" for i in range(1, NODES + 1)], states
    for node, (state, gres) in states.items():
        # idle unless some other test has a job running right now
        assert state in UP_STATES, f"{node} is {state}"
        assert f"gpu:{GPUS_PER_NODE}" in gres, f"{node} gres={gres}"
    out = slurm_cluster.run("sinfo", "-h", "-o", "%P").stdout.split()
    assert "debug*" in out and "batch" in out, out


def test_multi_node_srun_runs_a_task_per_node_with_gpus_visible(slurm_cluster):
    out = slurm_cluster.run(
        "srun", f"-N{NODES}", "--ntasks-per-node=2", f"--gpus-per-node={GPUS_PER_NODE}",
        "-t", "1", "bash", "-c",
        'echo "$SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS cvd=$CUDA_VISIBLE_DEVICES"',
        timeout=150,  # waits while another test's job holds the GPUs
    ).stdout
    tasks = [line.split() for line in out.splitlines() if line.strip()]
    assert len(tasks) == 2 * NODES, out
    assert sorted(int(t[1]) for t in tasks) == list(range(2 * NODES))
    assert {t[0] for t in tasks} == {f"n{i}" for i in range(1, NODES + 1)}
    assert all(t[2] == str(2 * NODES) for t in tasks), out
    gpus = ",".join(str(i) for i in range(GPUS_PER_NODE))
    assert all(t[3] == f"cvd={gpus}" for t in tasks), out


def test_requeued_job_restarts_within_ten_seconds(slurm_cluster, tmp_path: Path):
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
echo "${{SLURM_RESTART_COUNT:-0}} $(date +%s.%N)" >> {tmp_path}/starts
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
  date +%s.%N > {tmp_path}/requeued_at
  scontrol requeue "$SLURM_JOB_ID"
  sleep 120
fi
echo ok > {tmp_path}/done
""")
    job = slurm_cluster.sbatch(
        "--requeue", "-N1", "-t", "3", "--open-mode=append",
        "-o", str(tmp_path / "out.txt"), str(script),
    )
    done = tmp_path / "done"
    try:
        slurm_cluster.wait_for(done.exists, 45, f"requeued job {job} to finish its second run")
    finally:
        slurm_cluster.run("scancel", str(job), check=False)
    starts = [line.split() for line in (tmp_path / "starts").read_text().splitlines()]
    assert [s[0] for s in starts] == ["0", "1"], starts
    gap = float(starts[1][1]) - float((tmp_path / "requeued_at").read_text())
    print(f"requeue -> restart: {gap:.1f} s")
    assert gap < 10, f"requeued job took {gap:.1f} s to restart (cred_expire/scheduler settings?)"


def test_cancelled_job_shows_cancelled_in_sacct(slurm_cluster, tmp_path: Path):
    job = slurm_cluster.sbatch("-N1", "-t", "2", "-o", str(tmp_path / "out.txt"),
                               "--wrap", "sleep 300")

    def squeue_state():
        return slurm_cluster.run("squeue", "-h", "-j", str(job), "-o", "%T", check=False).stdout.strip()

    try:
        slurm_cluster.wait_for(lambda: squeue_state() == "RUNNING", 30, f"job {job} to run")
    finally:
        slurm_cluster.run("scancel", str(job))

    def sacct_state():
        out = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", str(job), "-o", "State").stdout
        rows = out.splitlines()  # e.g. "CANCELLED by 0"
        return rows[-1] if rows and rows[-1].startswith("CANCELLED") else None

    # the controller sends job records to slurmdbd asynchronously: poll
    state = slurm_cluster.wait_for(sacct_state, 30, f"sacct to show job {job} CANCELLED")
    assert state.startswith("CANCELLED")


def _daemon_pids(home: Path) -> dict[str, str]:
    pids = {}
    for f in sorted((home / "run").glob("*.pid")):
        pids[f.stem] = f.read_text().strip()
    return pids


def test_start_is_idempotent(slurm_cluster):
    home = slurm_cluster.home
    # rerun with the arguments the running cluster was started with
    header = (home / "etc" / "slurm.conf").read_text().splitlines()[0]
    args = re.search(r"start\.sh (.*)$", header).group(1).split()
    before = _daemon_pids(home)
    assert {"slurmctld", "slurmdbd"} <= set(before), before
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(START), *args], env=slurm_cluster.env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"source {home}/env.sh"
    assert _daemon_pids(home) == before, proc.stderr  # nothing restarted
    assert "already running" in proc.stderr
    assert took < 15, f"warm start.sh took {took:.1f} s"
    states = slurm_cluster.node_states()
    assert len(states) == NODES and all(s in UP_STATES for s, _ in states.values()), states
