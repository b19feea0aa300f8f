"""Rendezvous ports of a job: inside 20000..32767 (below Linux's ephemeral range, where any
outgoing connection may take a port between our check and our bind), distinct for neighbouring
job ids on one host, and shifted for each requeued attempt."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tulu.dist.groups import ENGINE_PORT_OFFSET, MAX_ENGINES_WITH_OWN_PORT  # noqa: E402
from tulu.launch.task_env import TaskEnv  # noqa: E402


def _env(job_id: str, restart: int = 0) -> TaskEnv:
    return TaskEnv(global_rank=0, world_size=1, node=0, local_rank=0, hostnames=("n1",), job_id=job_id,
                   restart_count=restart, cluster="slurm")


def test_every_port_of_every_attempt_is_below_the_ephemeral_range():
    highest = ENGINE_PORT_OFFSET + MAX_ENGINES_WITH_OWN_PORT - 1
    for job in ["0", "1", "198", "199", "700", "12345", "4294967295", "77_3"]:
        for restart in range(6):
            base = _env(job, restart).port_base()
            assert 20000 <= base and base + highest < 32768, (job, restart, base)


def test_neighbouring_jobs_and_requeued_attempts_get_separate_ports():
    bases = {_env(str(j)).port_base() for j in range(100, 199)}
    assert len(bases) == 99
    attempts = [_env("235", r).port_base() for r in range(4)]
    assert len(set(attempts)) == 4 and all(b - attempts[0] < 64 for b in attempts)


def test_a_step_on_a_subset_of_the_allocation_knows_its_own_nodes_and_attempt(monkeypatch):
    # With spare nodes the job holds n[1-3] and the step runs on n1,n3 as attempt 1 (an in-job
    # restart): SLURM_NODEID 1 is n3, not the job's second node, and the ports move on.
    from tulu.launch import task_env

    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4",
                 "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "1", "SLURM_PROCID": "2",
                 "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_STEP_NODELIST": "n[1,3]",
                 "SLURM_RESTART_COUNT": "0", "TULU_ATTEMPT": "1"}.items():
        monkeypatch.setenv(k, v)
    env = task_env.current()
    assert env.hostnames == ("n1", "n3") and env.hostname == "n3"
    assert env.restart_count == 1
    monkeypatch.delenv("TULU_ATTEMPT")
    assert task_env.current().restart_count == 0
