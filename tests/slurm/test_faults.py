"""Issue 5 acceptance: injected faults through the real local Slurm (4 nodes x 2 tasks, gloo).

For every fault the health monitor must detect it within its configured time-out (plus the
check interval and a few seconds of slack on busy CI cores), name the right rank AND node in
its report, requeue the job, and the counter job must resume from its last committed state and
finish COMPLETED with the total of an unfaulted run (steps x 36): no step lost, none counted
twice. A slow but progressing rank, and a long checkpoint within its learned time-out, must not
be reported at all.

To keep CI time low, one job meets five faults on five successive attempts (``restart=k``
fires a fault only on attempt k). Rank r runs on node n(r // 2 + 1).

Timing reference points (all from the run folder, no log parsing):
- fault time: the culprit's progress record at the time of the report; every fault fires at a
  fault point right after the culprit left its previous phase, so that record says "between
  phases since T" and T is the fault time (to a few ms);
- detection: the report's ``detected_at`` (after stacks were gathered) and the rule's own
  ``fault.elapsed_s`` (how long the waiting ranks had been in the phase when it fired);
- recovery: the first step any rank of the next attempt completed after resuming (polled from
  the progress records while the job runs).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitoring.record import read_record, record_path
from test_launch import COUNTER, Runner

WORLD = 8
CHECK_S = 0.5        # monitor check interval
TIMEOUT_S = 5.0      # configured train and checkpoint time-outs (learning off: exact)
SLACK_S = 2.0        # scheduling slack on 2 busy cores, on top of time-out + check interval
REPORT_S = 8.0       # from the rule firing to the report on disk (stack dumps wait up to 3 s)
CRASH_S = 10.0       # a crash has no time-out: srun's kill, then the EXIT trap's report

# Learning off and gloo's own time-out (monitoring.default_timeout_s, 120 s in the preset) far
# above the phase time-outs: the monitor, not gloo, must be what notices.
FAST_MONITOR = ("--set", f"monitoring.check_interval_s={CHECK_S}",
                "--set", f"monitoring.phase_timeouts_s.train={TIMEOUT_S}",
                "--set", f"monitoring.phase_timeouts_s.checkpoint={TIMEOUT_S}",
                "--set", "monitoring.stall_timeout_s=30",
                "--set", "monitoring.learn_timeouts=false")


def node_of(rank: int) -> str:
    return f"n{rank // 2 + 1}"


def expected_total(steps: int) -> int:
    return steps * WORLD * (WORLD + 1) // 2


@dataclass(frozen=True)
class Injected:
    """One fault of the sequence, and what the monitor must make of it."""

    kind: str          # monitoring.faults kind
    rank: int
    step: int
    point: str         # "train" (before the step's collective) or "checkpoint"
    attempt: int       # fires on this attempt only
    detected_as: str   # the rule: "hang" or "crash"
    timed_out: bool    # detected by a phase time-out (hangs), or at once (crashes)
    # The resume step is exact, except after SIGSTOP: Slurm's SIGCONT (sent with the requeue's
    # SIGTERM, which submitit bypasses) lets the old attempt run on until KillWait's SIGKILL.
    exact_resume: bool = True

    def spec(self) -> str:
        return (f"kind={self.kind},rank={self.rank},step={self.step},point={self.point},"
                f"restart={self.attempt}")

    @property
    def phase(self) -> str:
        return self.point


# Successive attempts; ranks spread over all four nodes; SIGSTOP last (see exact_resume).
SEQUENCE = (
    Injected("sigkill", rank=5, step=3, point="train", attempt=0, detected_as="crash", timed_out=False),
    Injected("exception", rank=6, step=6, point="train", attempt=1, detected_as="crash", timed_out=False),
    Injected("skip_collective", rank=0, step=9, point="train", attempt=2, detected_as="hang", timed_out=True),
    Injected("hang_checkpoint", rank=2, step=12, point="checkpoint", attempt=3, detected_as="hang",
             timed_out=True),
    Injected("sigstop", rank=3, step=15, point="train", attempt=4, detected_as="hang", timed_out=True,
             exact_resume=False),
)
SEQUENCE_STEPS = 30   # room after the SIGSTOP: the old attempt may run ~11 steps before SIGKILL


class StepWatcher(threading.Thread):
    """Remembers, per attempt, when a rank first completed a step after resuming (its record's
    second `step_done`: the first is the counter reporting where it resumed)."""

    def __init__(self, monitor_dir: Path, world: int = WORLD, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.monitor_dir, self.world, self.interval_s = monitor_dir, world, interval_s
        self.first_step: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for rank in range(self.world):
                try:
                    rec = read_record(record_path(self.monitor_dir, rank))
                except OSError:
                    rec = None
                if rec is None or rec.n_steps < 2:
                    continue
                # n_steps == 2: done_time is that first step; later, an upper bound we keep
                # only until an exact one is seen (polls every 0.1 s, steps take >= 0.4 s).
                t = rec.done_time if rec.n_steps == 2 else None
                old = self.first_step.get(rec.attempt)
                if old is None and t is None:
                    self.first_step[rec.attempt] = rec.done_time
                elif t is not None and (old is None or t < old):
                    self.first_step[rec.attempt] = t
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@pytest.fixture
def runner(slurm_cluster, tmp_path):
    return Runner(tmp_path)


def monitor_dir(runner: Runner, name: str) -> Path:
    return runner.cwd / "runs" / name / "monitor"


def decisions(runner: Runner, name: str) -> list[dict]:
    path = monitor_dir(runner, name) / "decisions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reports(runner: Runner, name: str) -> list[dict]:
    d = monitor_dir(runner, name) / "reports"
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []


def fault_time(report: dict, rank: int) -> float:
    """When the fault fired on ``rank``: it left its previous phase and never entered another."""
    rec = next(r for r in report["ranks"] if r["rank"] == rank)
    return rec["phase_start"]


def check_attempt(f: Injected, runner: Runner, name: str, history: list[dict],
                  first_step: dict[int, float]) -> tuple[list[str], dict]:
    """Every promise for one injected fault; returns (broken promises, measured figures)."""
    problems: list[str] = []
    tag = f"{f.kind} on rank {f.rank} ({node_of(f.rank)}) at step {f.step}, attempt {f.attempt}"
    requeues = [d for d in decisions(runner, name) if d["attempt"] == f.attempt and d["action"] == "requeue"]
    if len(requeues) != 1:
        return [f"{tag}: expected one requeue decision, got {requeues}"], {}
    d = requeues[0]
    if d["fault_kind"] != f.detected_as:
        problems.append(f"{tag}: decided as {d['fault_kind']!r}, expected {f.detected_as!r}")
    if d["culprit_ranks"] != [f.rank] or d["culprit_nodes"] != [node_of(f.rank)]:
        problems.append(f"{tag}: decision blames ranks {d['culprit_ranks']} on {d['culprit_nodes']}")
    report = json.loads(Path(d["report"]).read_text())
    blamed = [(c["rank"], c["node"]) for c in report["culprits"]]
    if blamed != [(f.rank, node_of(f.rank))]:
        problems.append(f"{tag}: report blames {blamed}: {report['summary']}")
        return problems, {}
    if report["kind"] != f.detected_as or report["attempt"] != f.attempt:
        problems.append(f"{tag}: report kind {report['kind']} attempt {report['attempt']}")
    t_fault = fault_time(report, f.rank)
    detection = report["detected_at"] - t_fault
    figures = {"fault": f.kind, "rank": f.rank, "node": node_of(f.rank),
               "detection_s": round(detection, 2), "rule_elapsed_s": report["fault"]["elapsed_s"]}
    if f.timed_out:
        fr = report["fault"]
        if (fr["phase"], fr["step"], fr["timeout_s"]) != (f.phase, f.step, TIMEOUT_S):
            problems.append(f"{tag}: hang seen in phase {fr['phase']!r} step {fr['step']} with time-out "
                            f"{fr['timeout_s']}, expected {f.phase!r} step {f.step} with {TIMEOUT_S}")
        if not TIMEOUT_S <= fr["elapsed_s"] <= TIMEOUT_S + CHECK_S + SLACK_S:
            problems.append(f"{tag}: rule fired after {fr['elapsed_s']} s in phase, time-out {TIMEOUT_S}")
        if not TIMEOUT_S <= detection <= TIMEOUT_S + CHECK_S + REPORT_S:
            problems.append(f"{tag}: reported {detection:.1f} s after the fault (time-out {TIMEOUT_S})")
    elif not 0 <= detection <= CRASH_S:
        problems.append(f"{tag}: crash reported {detection:.1f} s after the fault")

    # Resumed on the next attempt from the state committed before the fault (the counter saves
    # at every step; the fault fires after step `f.step` was saved).
    nxt = [h for h in history if h["attempt"] == f.attempt + 1]
    if not nxt:
        problems.append(f"{tag}: attempt {f.attempt + 1} never resumed; history {history}")
        return problems, figures
    resumed = nxt[0]["resumed_at"]
    if resumed < f.step or (f.exact_resume and resumed != f.step):
        problems.append(f"{tag}: attempt {f.attempt + 1} resumed at step {resumed}, last committed "
                        f"before the fault was {f.step}")
    figures["resumed_at"] = resumed
    if f.attempt + 1 in first_step:
        figures["recovery_s"] = round(first_step[f.attempt + 1] - t_fault, 2)
    return problems, figures


def test_five_faults_on_successive_attempts_are_each_detected_blamed_on_the_right_rank_and_node_and_resumed_without_losing_a_step(runner):
    name = "faults"
    faults = ";".join(f.spec() for f in SEQUENCE)
    watcher = StepWatcher(monitor_dir(runner, name))
    watcher.start()
    try:
        job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, *FAST_MONITOR,
                            "--set", f"run.name={name}", "--set", f"run.counter_steps={SEQUENCE_STEPS}",
                            "--set", f"monitoring.max_restarts={len(SEQUENCE) + 1}",
                            "--set", f"cluster.env.TULU_FAULT={faults}")
        st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900)
    finally:
        watcher.stop()
    history = runner.counter_state(name)["history"]
    problems, measured = [], []
    for f in SEQUENCE:
        p, figures = check_attempt(f, runner, name, history, watcher.first_step)
        problems += p
        measured.append(figures)
    print("\n" + "\n".join(json.dumps(m) for m in measured))
    assert not problems, "\n".join(problems) + f"\nmeasured: {measured}\ndecisions: {decisions(runner, name)}"

    assert st["state"] == "COMPLETED", st
    assert int(st["restarts"]) == len(SEQUENCE)
    state = runner.counter_state(name)
    assert state.get("done") and state["step"] == SEQUENCE_STEPS
    assert state["total"] == expected_total(SEQUENCE_STEPS), "a step was lost or counted twice"
    assert [h["attempt"] for h in history] == list(range(len(SEQUENCE) + 1))
    # One requeue per fault, nothing stopped the chain, and `tulu status` shows the last report.
    acts = [(d["attempt"], d["action"]) for d in decisions(runner, name) if d["action"] in ("requeue", "stop")]
    assert acts == [(f.attempt, "requeue") for f in SEQUENCE]
    last = SEQUENCE[-1]
    assert f"rank {last.rank} on {node_of(last.rank)}" in runner.tulu("status", job).stdout


def test_crashes_that_srun_ends_before_the_sidecar_looks_are_blamed_on_the_right_rank_by_the_exit_trap(runner):
    # The sidecar checks once a minute here, so every crash is handled by the batch script's
    # EXIT trap (monitoring.on_exit) after srun's --kill-on-bad-exit took the step down: it
    # cannot see pids, only records and srun's messages ("srun: error: n3: task 5: Killed"),
    # which accumulate in the batch log across requeues (hence a second SIGKILL on attempt 1).
    name = "exittrap"
    seq = (Injected("sigkill", rank=5, step=3, point="train", attempt=0, detected_as="crash", timed_out=False),
           Injected("sigkill", rank=7, step=6, point="train", attempt=1, detected_as="crash", timed_out=False))
    steps = 9
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER,
                        "--set", f"run.name={name}", "--set", f"run.counter_steps={steps}",
                        "--set", "monitoring.check_interval_s=60",
                        "--set", f"monitoring.max_restarts={len(seq) + 1}",
                        "--set", "cluster.env.TULU_FAULT=" + ";".join(f.spec() for f in seq))
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900)
    history = runner.counter_state(name)["history"]
    problems, measured = [], []
    for f in seq:
        p, figures = check_attempt(f, runner, name, history, {})
        problems += p
        measured.append(figures)
    print("\n" + "\n".join(json.dumps(m) for m in measured))
    by = [d["by"] for d in decisions(runner, name) if d["action"] == "requeue"]
    assert not problems, "\n".join(problems) + f"\nrequeued by {by}\ndecisions: {decisions(runner, name)}"
    assert by == ["on_exit"] * len(seq), f"the sidecar, not the EXIT trap, handled some crash: {by}"
    assert st["state"] == "COMPLETED" and int(st["restarts"]) == len(seq), st
    state = runner.counter_state(name)
    assert state["step"] == steps and state["total"] == expected_total(steps)


def test_a_slow_but_progressing_straggler_and_a_long_checkpoint_within_their_learned_timeouts_are_not_reported(runner):
    # Rank 3 arrives 1.5 s late at every step's collective (the others wait ~1.9 s in "train");
    # rank 6 arrives 2 s late at every checkpoint barrier. From step 6 both get 4.5 s slower:
    # the others then wait ~6.4 s, past the configured 5 s, but within the learned time-outs
    # (5 x ~2 s): only learning keeps these healthy phases from being reported as hangs.
    name = "straggler"
    late = ("kind=straggler,rank=3,point=train,step=0,seconds=1.5;"
            "kind=straggler,rank=3,point=train,step=6,seconds=4.5;"
            "kind=straggler,rank=6,point=checkpoint,step=1,seconds=2;"
            "kind=straggler,rank=6,point=checkpoint,step=6,seconds=4.5")
    steps = 8
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER,
                        "--set", f"run.name={name}", "--set", f"run.counter_steps={steps}",
                        "--set", f"monitoring.check_interval_s={CHECK_S}",
                        "--set", f"monitoring.phase_timeouts_s.train={TIMEOUT_S}",
                        "--set", f"monitoring.phase_timeouts_s.checkpoint={TIMEOUT_S}",
                        "--set", "monitoring.stall_timeout_s=30",
                        "--set", "monitoring.learn_timeouts=true", "--set", "monitoring.safety_factor=5",
                        "--set", "monitoring.min_learned_timeout_s=2",
                        "--set", f"cluster.env.TULU_FAULT={late}")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900)
    assert reports(runner, name) == [], [r["summary"] for r in reports(runner, name)]
    assert [d for d in decisions(runner, name) if d["action"] != "none"] == []
    assert st["state"] == "COMPLETED" and int(st["restarts"]) == 0, st
    state = runner.counter_state(name)
    assert state["step"] == steps and state["total"] == expected_total(steps)

    learned = json.loads((monitor_dir(runner, name) / "learned_timeouts.json").read_text())
    print("\n" + json.dumps(learned))
    for phase, late_s in (("train", 1.5), ("checkpoint", 2.0)):
        longest = learned["observed"][phase][0]
        # The slow phases really outlasted the configured time-out (so the test can fail) ...
        assert longest > TIMEOUT_S, f"{phase}: longest observed {longest:.1f} s never passed {TIMEOUT_S} s"
        # ... and the learned time-out was raised by the straggler's observed durations.
        assert learned["timeouts"][phase] >= 5 * late_s, learned


def test_a_sigstopped_rank_is_killed_before_the_requeue_even_when_scontrol_fails_once(runner, slurm_cluster, tmp_path):
    # The job's first `scontrol requeue` fails (a PATH shim in the batch script, as when slurmctld
    # is briefly unreachable): the monitor retries, requeues once, and writes its marker only
    # then. Rank 3 SIGSTOPs itself after step 3 was saved; the monitor SIGKILLs the attempt's
    # ranks before the requeue, so Slurm's SIGCONT revives nothing: attempt 1 resumes at step 3
    # exactly (before, the old attempt ran on until KillWait and committed more steps).
    name = "stopfail"
    shim = tmp_path / "shim"
    shim.mkdir()
    real = shutil.which("scontrol", path=slurm_cluster.env.get("PATH", os.environ["PATH"]))
    failed = shim / "failed_once"
    (shim / "scontrol").write_text(f"""#!/bin/bash
if [[ ( "$1" == requeue || "$1" == requeuehold ) && ! -e {shlex.quote(str(failed))} ]]; then
  echo "$*" > {shlex.quote(str(failed))}
  echo "slurm_requeue error: Unable to contact slurm controller (shim)" >&2
  exit 1
fi
exec {shlex.quote(real)} "$@"
""")
    (shim / "scontrol").chmod(0o755)
    path = f"{shim}:{slurm_cluster.env.get('PATH', os.environ['PATH'])}"
    f = Injected("sigstop", rank=3, step=3, point="train", attempt=0, detected_as="hang", timed_out=True)
    steps = 8
    job = runner.submit("tiny-cpu-rehearse.yaml", *COUNTER, *FAST_MONITOR,
                        "--set", f"run.name={name}", "--set", f"run.counter_steps={steps}",
                        "--set", "monitoring.max_restarts=2",
                        "--set", f"cluster.env.PATH={path}",
                        "--set", f"cluster.env.TULU_FAULT={f.spec()}")
    st = runner.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    history = runner.counter_state(name)["history"]
    problems, figures = check_attempt(f, runner, name, history, {})
    print("\n" + json.dumps(figures))
    assert failed.exists(), "the shim never failed a requeue: the test proved nothing"
    assert not problems, "\n".join(problems) + f"\ndecisions: {decisions(runner, name)}"
    acts = [(d["attempt"], d["action"], d["by"]) for d in decisions(runner, name)
            if d["action"] in ("requeue", "requeue_failed", "stop")]
    assert acts == [(0, "requeue", "sidecar")], acts
    killed = [d for d in decisions(runner, name) if d["action"] == "requeue"][0]["killed"]
    assert any(k.startswith("step ") for k in killed), killed
    assert (monitor_dir(runner, name) / "requeued" / f"{job}_0.json").exists()
    assert st["state"] == "COMPLETED" and int(st["restarts"]) == 1, st
    state = runner.counter_state(name)
    assert state["step"] == steps and state["total"] == expected_total(steps)
