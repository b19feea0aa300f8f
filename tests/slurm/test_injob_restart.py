"""Issue 16: restart inside the allocation with spare nodes, through the real local Slurm with
isolated nodes (each slurmd in its own PID namespace; see test_monitor_nodes.py).

A counter job on 2 nodes + 1 spare (``cluster.spare_nodes: 1``; the local cluster has n1..n4):
the batch script runs on n1, the training step on the active nodes (n1, n2 at first), rank r
on the step's node r // 2. A fault makes the monitor kill the step, swap the culprit's node for
the spare and start the next step (the next attempt) in the same allocation; without a spare
left it requeues as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from monitoring.record import read_record, record_path
from monitoring.recovery import AGENTS_STEP
from test_faults import (CHECK_S, FAST_MONITOR, REPORT_S, TIMEOUT_S, Injected, StepWatcher, check_attempt, decisions,
                         fault_time, monitor_dir, reports)
from test_launch import COUNTER, runner  # noqa: F401 - the fixture
from test_monitor_nodes import isolated  # noqa: F401 - the fixture

WORLD = 4                       # 2 nodes x 2 tasks
RECOVERY_SLACK_S = 10.0         # the promise: next step within phase time-out + 10 s of the fault
TWO_PLUS_SPARE = ("--set", "cluster.nodes=2", "--set", "cluster.spare_nodes=1",
                  # inference on the first node, TP1 x PP2 x DP1 training on the second
                  "--set", "groups.training.dp=1")


def total(steps: int) -> int:
    return steps * WORLD * (WORLD + 1) // 2


def acts(runner, name: str) -> list[tuple[int, str]]:
    return [(d["attempt"], d["action"]) for d in decisions(runner, name)
            if d["action"] in ("restart", "requeue", "stop", "requeue_failed", "restart_failed")]


def rank_nodes(mon: Path) -> dict[int, tuple[int, str]]:
    """rank -> (attempt, node) of each rank's last progress record."""
    out = {}
    for rank in range(WORLD):
        rec = read_record(record_path(mon, rank))
        out[rank] = (rec.attempt, rec.node)
    return out


def test_a_hang_on_a_non_batch_node_restarts_the_step_on_the_spare_within_the_phase_timeout_plus_10s_without_a_requeue(isolated, runner):  # noqa: F811
    name = "injob"
    f = Injected("sigstop", rank=3, step=3, point="train", attempt=0, detected_as="hang", timed_out=True)
    steps = 10
    mon = monitor_dir(runner, name)
    watcher = StepWatcher(mon, world=WORLD)
    watcher.start()
    try:
        job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, *FAST_MONITOR, *TWO_PLUS_SPARE,
                            "--set", f"run.name={name}", "--set", f"run.counter_steps={steps}",
                            "--set", "monitoring.max_restarts=2",
                            "--set", f"cluster.env.TULU_FAULT={f.spec()}")
        st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    finally:
        watcher.stop()
    decided = decisions(runner, name)
    assert acts(runner, name) == [(0, "restart")], decided
    (d,) = [x for x in decided if x["action"] == "restart"]
    assert (d["by"], d["fault_kind"], d["culprit_ranks"], d["culprit_nodes"]) == ("sidecar", "hang", [3], ["n2"]), d
    assert d["swaps"] == [{"node": "n2", "by": "n3", "attempt": 0}] and d["active"] == ["n1", "n3"], d
    # Exactly one step was killed, the training step (sacct names the steps; step ids depend
    # on whether the agents' background srun or the training srun got to slurmctld first) ...
    (killed,) = [k.removeprefix("step ") for k in d["killed"] if k.startswith("step ")]
    names = dict(line.split("|", 1) for line in isolated.run(
        "sacct", "-n", "-P", "-j", job, "-o", "JobID,JobName").stdout.split())
    assert names[killed] != AGENTS_STEP and AGENTS_STEP in names.values(), (killed, names)
    # ... and the agents' step lived on: n3's agent followed the job to attempt 1.
    beat = json.loads((mon / "agents" / "n3.json").read_text())
    assert beat["attempt"] == 1, beat

    # The report names the hung rank on its node, with the stack its node's agent read.
    (report,) = reports(runner, name)
    assert [(c["rank"], c["node"]) for c in report["culprits"]] == [(3, "n2")], report["summary"]
    s3 = report["stacks"]["3"]
    assert s3["node"] == "n2" and s3["proc_state"].startswith("T"), s3

    # The next step (attempt 1) ran on n1 and the spare n3, never on the culprit's node.
    assert rank_nodes(mon) == {0: (1, "n1"), 1: (1, "n1"), 2: (1, "n3"), 3: (1, "n3")}
    state = json.loads((mon / "injob" / f"{job}.json").read_text())
    assert (state["attempt"], state["active"], state["spares"]) == (1, ["n1", "n3"], []), state

    # Within phase time-out + 10 s of the fault, the job completed a training step again.
    t_fault = fault_time(report, f.rank)
    assert 1 in watcher.first_step, f"no step of attempt 1 was seen: {watcher.first_step}"
    recovery = watcher.first_step[1] - t_fault
    detection = report["detected_at"] - t_fault
    restarted = d["time"] - t_fault
    figures = {"path": "in-job", "fault": f.kind, "detection_s": round(detection, 2),
               "restart_decided_s": round(restarted, 2), "recovery_s": round(recovery, 2)}
    print("\n" + json.dumps(figures))
    # The monitor's own part: the restart is decided (the step killed, the spare swapped in)
    # within the time-out, the check interval and the report's stack dumps.
    assert TIMEOUT_S <= detection <= restarted <= TIMEOUT_S + CHECK_S + REPORT_S, figures
    # The promise, start-up of the new step included (torch import and process groups: on 2
    # cores shared with other work this is the part that grows; the figures say which part).
    assert recovery <= TIMEOUT_S + RECOVERY_SLACK_S, \
        f"fault -> next step {recovery:.1f} s, promised <= {TIMEOUT_S + RECOVERY_SLACK_S}: {figures}"

    # No requeue: Slurm's restart count is still 0; the run resumed exactly where it was saved.
    assert st["state"] == "COMPLETED" and int(st["restarts"]) == 0, st
    counter = runner.counter_state(name)
    assert [(h["attempt"], h["resumed_at"]) for h in counter["history"]] == [(0, 0), (1, f.step)], counter
    assert counter["step"] == steps and counter["total"] == total(steps), "a step was lost or counted twice"


def test_a_crash_restarts_on_the_spare_and_the_next_fault_without_a_spare_left_is_requeued(isolated, runner):  # noqa: F811
    # Attempt 0: rank 3 (n2) is SIGKILLed: a crash, restarted in the job on the spare n3.
    # Attempt 1: rank 1 (on n1, the batch node) SIGSTOPs itself: no spare is left, so the
    # monitor requeues the job (excluding n1) and attempt 2 runs in a new allocation.
    name = "nospare"
    crash = Injected("sigkill", rank=3, step=3, point="train", attempt=0, detected_as="crash", timed_out=False)
    hang = Injected("sigstop", rank=1, step=6, point="train", attempt=1, detected_as="hang", timed_out=True)
    steps = 9
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, *FAST_MONITOR, *TWO_PLUS_SPARE,
                        "--set", f"run.name={name}", "--set", f"run.counter_steps={steps}",
                        "--set", "monitoring.max_restarts=3",
                        "--set", f"cluster.env.TULU_FAULT={crash.spec()};{hang.spec()}")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    decided = decisions(runner, name)
    assert acts(runner, name) == [(0, "restart"), (1, "requeue")], decided
    restart = next(d for d in decided if d["action"] == "restart")
    assert (restart["fault_kind"], restart["culprit_ranks"], restart["culprit_nodes"]) == ("crash", [3], ["n2"]), restart
    assert restart["active"] == ["n1", "n3"], restart
    requeue = next(d for d in decided if d["action"] == "requeue")
    assert "no spare node left" in requeue["reason"], requeue["reason"]

    # The requeue path's own promises (report, blame, exact resume on the next attempt).
    history = runner.counter_state(name)["history"]
    problems, figures = check_attempt(hang, runner, name, history, {})
    print("\n" + json.dumps(figures))
    assert not problems, "\n".join(problems) + f"\ndecisions: {decided}"

    assert st["state"] == "COMPLETED" and int(st["restarts"]) == 1, st
    counter = runner.counter_state(name)
    assert [(h["attempt"], h["resumed_at"]) for h in counter["history"]] == [(0, 0), (1, 3), (2, 6)], counter
    assert counter["step"] == steps and counter["total"] == total(steps), "a step was lost or counted twice"
    # The requeued allocation starts with its own spare again, at the next attempt number.
    state = json.loads((monitor_dir(runner, name) / "injob" / f"{job}.json").read_text())
    assert state["attempt"] == 2 and len(state["active"]) == 2 and len(state["spares"]) == 1, state
    assert "n1" not in state["active"] + state["spares"], f"the requeue did not exclude n1: {state}"
