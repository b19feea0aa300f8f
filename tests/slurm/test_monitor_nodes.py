"""Issue 16: the monitor sees every node, on a local Slurm whose nodes do not share a process view.

The module runs the cluster with ``start.sh --isolate-nodes`` (each slurmd in its own PID and
mount namespace) and puts it back in the mode it found it in afterwards. The batch script runs
on n1 with the sidecar; one monitor agent per node (`monitoring.agent`) reads its own ranks'
pids and stacks. Rank r runs on node n(r // 2 + 1).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import START, _cluster, _cluster_is_up, read_env_sh, slurm_home
from test_faults import FAST_MONITOR, Injected, check_attempt, decisions, expected_total, monitor_dir, reports
from test_launch import COUNTER, runner  # noqa: F401 - the fixture


def _start(*flags: str) -> None:
    proc = subprocess.run(["bash", str(START), *flags], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"start.sh {' '.join(flags)} exited {proc.returncode}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def isolated(slurm_cluster):
    """The local cluster with every node in its own PID namespace; the previous mode after."""
    was = read_env_sh(slurm_home() / "env.sh").get("TULU_SLURM_ISOLATED") == "1"
    if not was:
        _start("--isolate-nodes")
    cluster = _cluster(slurm_home())
    assert _cluster_is_up(cluster) and cluster.env.get("TULU_SLURM_ISOLATED") == "1"
    yield cluster
    if not was:
        _start("--shared-nodes")


def test_a_process_started_on_one_node_is_invisible_from_another(isolated, tmp_path):
    script = tmp_path / "iso.sbatch"
    pidfile = tmp_path / "pid"
    script.write_text(f"""#!/bin/bash
srun -N1 -n1 -w n2 --overlap bash -c 'echo $$ > {pidfile}; exec sleep 20' &
for i in $(seq 100); do [ -s {pidfile} ] && break; sleep 0.1; done
P=$(cat {pidfile})
for n in n1 n2; do
  srun -N1 -n1 -w $n --overlap bash -c "echo $n:\\$(tr '\\\\0' ' ' < /proc/$P/cmdline 2>/dev/null)"
done
kill %1; wait
""")
    out = tmp_path / "iso.out"
    job = isolated.sbatch("-N", "2", "-w", "n[1-2]", "-o", str(out), str(script))
    isolated.wait_for(lambda: not isolated.run("squeue", "-h", "-j", str(job)).stdout.strip(), 60,
                      f"job {job} to end")
    lines = dict(line.split(":", 1) for line in out.read_text().splitlines() if line[:3] in ("n1:", "n2:"))
    assert lines["n2"].strip() == "sleep 20", out.read_text()
    # Pids of different nodes collide: n1 may have its own process under that number (here
    # often the batch script's srun, whose command line holds "sleep 20"), never n2's.
    assert lines["n1"].strip() != "sleep 20", f"n1 sees n2's process: {out.read_text()}"


def test_a_hang_on_a_non_batch_node_is_reported_with_that_nodes_stacks_and_requeued(isolated, runner):
    name = "nodes"
    f = Injected("sigstop", rank=3, step=3, point="train", attempt=0, detected_as="hang", timed_out=True)
    steps = 6
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, *FAST_MONITOR,
                        "--set", f"run.name={name}", "--set", f"run.counter_steps={steps}",
                        "--set", "monitoring.max_restarts=2",
                        "--set", f"cluster.env.TULU_FAULT={f.spec()}")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    history = runner.counter_state(name)["history"]
    problems, figures = check_attempt(f, runner, name, history, {})
    print("\n" + json.dumps(figures))
    assert not problems, "\n".join(problems) + f"\ndecisions: {decisions(runner, name)}"

    (report,) = reports(runner, name)
    assert report["reporter"]["node"] == "n1", report["reporter"]
    s3 = report["stacks"]["3"]
    assert s3["node"] == "n2" and s3["method"] in ("py-spy", "proc") and s3["proc_state"].startswith("T"), s3
    assert [(c["rank"], c["node"]) for c in report["culprits"]] == [(3, "n2")]
    # Every node answered, and the live ranks elsewhere dumped their stacks from their own node.
    assert {n for n, a in report["agents"].items() if a["answered"]} == {"n2", "n3", "n4"}, report["agents"]
    for rank in (0, 5, 7):
        s = report["stacks"][str(rank)]
        assert s["node"] == f"n{rank // 2 + 1}" and s["method"] == "faulthandler" and s["text"], s
    text = (monitor_dir(runner, name) / "last_report.txt").read_text()
    assert "--- rank 3 on n2" in text and "not reachable" not in text

    acts = [(d["attempt"], d["action"], d["by"]) for d in decisions(runner, name)
            if d["action"] in ("requeue", "requeue_failed", "stop")]
    assert acts == [(0, "requeue", "sidecar")], acts
    assert st["state"] == "COMPLETED" and int(st["restarts"]) == 1, st
    state = runner.counter_state(name)
    assert state["step"] == steps and state["total"] == expected_total(steps)
