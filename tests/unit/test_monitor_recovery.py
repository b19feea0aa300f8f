"""The recovery policy against a fake scontrol/sinfo/scancel that log their argv: requeue
(with ExcNodeList only when spare nodes exist), budget, the same-fault-twice stop, one
decision per attempt, and the batch-script lines that take the decision when srun returns."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitoring.config import MonitorConfig
from monitoring.on_exit import decide_on_exit
from monitoring.recovery import (
    EXIT_DO_NOT_REQUEUE, decide, handle_fault, read_decisions, request_requeue, setup_lines,
)
from monitoring.slurm import expand_hostlist, parse_job, spare_nodes

ROOT = Path(__file__).resolve().parents[2]
JOB = ("JobId=77 JobName=rlvr UserId=root(0) JobState=RUNNING Reason=None Requeue=1 "
       "Restarts={restarts} BatchFlag=1 NodeList=n[1-2] NumNodes=2 NumCPUs=16 "
       "Partition=debug ExcNodeList=(null) Command=/a b/submit.sh")
SINFO_SPARE = "n1 alloc\nn2 alloc\nn3 idle\nn4 mix\n"
SINFO_FULL = "n1 alloc\nn2 alloc\nn3 down*\nn4 drain\n"
CFG = MonitorConfig(max_restarts=3)


class FakeSlurm:
    def __init__(self, root: Path) -> None:
        self.bin, self.log = root / "fakebin", root / "slurm_calls.log"
        self.bin.mkdir()
        self.state = root / "fake_state"
        self.state.mkdir()
        self.set(job=JOB.format(restarts=0), sinfo=SINFO_SPARE)
        for tool in ("scontrol", "sinfo", "scancel"):
            p = self.bin / tool
            p.write_text(f"""#!/bin/bash
echo "{tool} $*" >> "{self.log}"
if [[ {tool} == scontrol && "$1" == show ]]; then cat "{self.state}/job"; fi
if [[ {tool} == sinfo ]]; then cat "{self.state}/sinfo"; fi
exit 0
""")
            p.chmod(0o755)

    def set(self, job: str | None = None, sinfo: str | None = None) -> None:
        if job is not None:
            (self.state / "job").write_text(job)
        if sinfo is not None:
            (self.state / "sinfo").write_text(sinfo)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def actions(self) -> list[str]:
        return [c for c in self.calls() if not c.startswith(("scontrol show", "sinfo"))]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    f = FakeSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{f.bin}{os.pathsep}{os.environ['PATH']}")
    return f


def fault(mon, attempt, kind="hang", step=5, nodes=("n2",), cfg=CFG, running=True):
    return handle_fault(mon, job_id="77", attempt=attempt, fault_kind=kind, step=step, cfg=cfg,
                        culprit_nodes=list(nodes), culprit_ranks=[3], by="test",
                        job_running=running)


# ---------------------------------------------------------------- parsers (captured text)
def test_scontrol_show_job_is_parsed():
    info = parse_job(JOB.format(restarts=2))
    assert (info.job_id, info.state, info.restarts, info.num_nodes, info.partition) == \
        ("77", "RUNNING", 2, 2, "debug")
    assert info.nodes == ["n1", "n2"] and info.excluded == []


def test_hostlists_expand_with_ranges_and_padding():
    assert expand_hostlist("n[1-3,5],gpu07,a[08-10]") == \
        ["n1", "n2", "n3", "n5", "gpu07", "a08", "a09", "a10"]
    assert expand_hostlist("(null)") == []


def test_spare_nodes_counts_usable_nodes_outside_the_exclusion():
    job = parse_job(JOB.format(restarts=0))
    assert spare_nodes(SINFO_SPARE, job, ["n2"])[0]
    ok, why = spare_nodes(SINFO_FULL, job, ["n2"])
    assert not ok and "needs 2" in why


# ---------------------------------------------------------------- policy (pure)
def test_budget_and_no_progress_rules():
    cfg = MonitorConfig(max_restarts=2)
    h = [{"job_id": "77", "attempt": 0, "action": "requeue", "fault_kind": "hang", "step": 4}]
    assert decide(h, job_id="77", attempt=1, fault_kind="hang", step=9, cfg=cfg).action == "requeue"
    assert decide(h, job_id="77", attempt=1, fault_kind="crash", step=4,
                  cfg=cfg).action == "requeue"
    same = decide(h, job_id="77", attempt=1, fault_kind="hang", step=4, cfg=cfg)
    assert same.action == "stop" and "no progress" in same.reason
    h.append({"job_id": "77", "attempt": 1, "action": "requeue", "fault_kind": "crash", "step": 9})
    spent = decide(h, job_id="77", attempt=2, fault_kind="hang", step=20, cfg=cfg)
    assert spent.action == "stop" and "budget" in spent.reason
    assert decide(h, job_id="78", attempt=0, fault_kind="hang", step=4,
                  cfg=cfg).action == "requeue"   # another job's history does not count


# ---------------------------------------------------------------- actions (fake Slurm)
def test_requeue_excludes_the_culprit_node_when_spare_nodes_exist(tmp_path, fake):
    d = fault(tmp_path / "mon", 0)
    assert d.action == "requeue" and d.exclude_nodes == ("n2",)
    assert fake.actions() == ["scontrol requeuehold 77",
                              "scontrol update JobId=77 ExcNodeList=n2",
                              "scontrol release 77"]
    assert [e["action"] for e in read_decisions(tmp_path / "mon")] == ["requeue", "exclusion"]


def test_requeue_without_exclusion_when_the_cluster_has_no_spare_node(tmp_path, fake):
    fake.set(sinfo=SINFO_FULL)
    d = fault(tmp_path / "mon", 0)
    assert d.action == "requeue" and d.exclude_nodes == ()
    assert fake.actions() == ["scontrol requeue 77"]
    assert "needs 2" in read_decisions(tmp_path / "mon")[-1]["reason"]


def test_exhausted_budget_stops_the_chain_and_cancels_the_hung_job(tmp_path, fake):
    mon = tmp_path / "mon"
    cfg = dataclasses.replace(CFG, max_restarts=2)
    assert fault(mon, 0, step=1, cfg=cfg).action == "requeue"
    assert fault(mon, 1, step=2, cfg=cfg).action == "requeue"
    d = fault(mon, 2, step=3, cfg=cfg)
    assert d.action == "stop" and "budget exhausted" in d.reason
    assert fake.actions()[-1] == "scancel 77"
    assert json.loads((mon / "do_not_requeue.json").read_text())["reason"] == d.reason


def test_same_fault_at_the_same_step_twice_stops_with_a_clear_reason(tmp_path, fake):
    mon = tmp_path / "mon"
    assert fault(mon, 0, step=5).action == "requeue"
    d = fault(mon, 1, step=5)
    assert d.action == "stop"
    assert "same fault (hang) at the same step (5)" in d.reason
    assert decide_on_exit(143, mon, 4, CFG, job_id="77", attempt=1) == EXIT_DO_NOT_REQUEUE


def test_second_fault_in_the_same_attempt_does_not_requeue_twice(tmp_path, fake):
    mon = tmp_path / "mon"
    assert fault(mon, 0, nodes=()).action == "requeue"
    d = fault(mon, 0, kind="crash", nodes=())
    assert d.action == "none" and "already requeued" in d.reason
    assert fake.actions() == ["scontrol requeue 77"]


def test_attempt_already_requeued_by_submitit_is_left_alone(tmp_path, fake):
    fake.set(job=JOB.format(restarts=1))       # Restarts=1 while we are attempt 0
    assert decide_on_exit(143, tmp_path / "mon", 2, CFG, job_id="77", attempt=0) == 143
    assert fake.actions() == []


def test_cancelled_job_is_not_requeued(tmp_path, fake):
    fake.set(job=JOB.format(restarts=0).replace("RUNNING", "CANCELLED"))
    assert decide_on_exit(143, tmp_path / "mon", 2, CFG, job_id="77", attempt=0) == 143
    assert fake.actions() == []


def test_crash_after_srun_returns_is_reported_and_requeued(tmp_path, fake):
    mon = tmp_path / "mon"
    (mon).mkdir()
    (mon / "77_0_log.err").write_text("srun: error: n2: task 3: Exited with exit code 3\n")
    cfg = dataclasses.replace(CFG, log_globs=[str(mon / "*_log.err")])
    assert decide_on_exit(3, mon, 4, cfg, job_id="77", attempt=0) == 3
    report = json.loads((mon / "last_report.json").read_text())
    assert report["kind"] == "crash" and report["culprits"][0]["rank"] == 3
    assert report["culprit_nodes"] == ["n2"]
    assert fake.actions()[0] == "scontrol requeuehold 77"


def test_clean_exit_finishes_unless_the_graceful_path_asked_for_a_requeue(tmp_path, fake):
    mon = tmp_path / "mon"
    assert decide_on_exit(0, mon, 2, CFG, job_id="77", attempt=0) == 0
    assert fake.actions() == []
    request_requeue(mon, "77", 1, "preempted: saved step 40")
    assert decide_on_exit(0, mon, 2, CFG, job_id="77", attempt=1) == 0
    assert fake.actions() == ["scontrol requeue 77"]
    entry = [e for e in read_decisions(mon) if e["action"] == "requeue"][0]
    assert entry["fault_kind"] == "requested"            # does not spend the fault budget


# ---------------------------------------------------------------- the sbatch lines, in bash
WEIRD = "mon dir 'with' \"quotes\" $HOME `x`"


def _script(tmp_path: Path, body: str, cfg: MonitorConfig = CFG) -> tuple[Path, Path]:
    mon = tmp_path / WEIRD
    lines = setup_lines(mon, 1, cfg)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n" + "\n".join(lines) + "\n" + body + "\n")
    return script, mon


def test_setup_lines_requeue_a_crash_seen_by_the_exit_trap_with_a_weird_path(tmp_path, fake):
    script, mon = _script(tmp_path, 'echo "$TULU_MONITOR_DIR" > "$TULU_MONITOR_DIR/seen"\n'
                                    "(exit 3)  # srun: a task exited with 3")
    env = dict(os.environ, SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3, out.stderr
    assert (mon / "seen").read_text().strip() == str(mon)
    assert "scontrol requeue 77" in fake.calls()
    entry = [e for e in read_decisions(mon) if e["action"] == "requeue"][0]
    assert entry["by"] == "on_exit" and entry["rc"] == 3
    assert (mon / "monitor_77_0.log").exists()


def test_setup_lines_see_143_when_slurm_terminates_the_batch_script(tmp_path, fake):
    script, mon = _script(tmp_path, "sleep 30 & wait $!")
    env = dict(os.environ, SLURM_JOB_ID="77", SLURM_RESTART_COUNT="2")
    p = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True)
    deadline = time.monotonic() + 20
    while not (mon / "monitor_77_2.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGTERM)          # Slurm signals every process of the job
    assert p.wait(timeout=60) == 143
    entry = [e for e in read_decisions(mon) if e["action"] == "requeue"][0]
    assert entry["rc"] == 143 and entry["attempt"] == 2


def test_setup_lines_exit_with_do_not_requeue_code_once_the_chain_is_stopped(tmp_path, fake):
    script, mon = _script(tmp_path, "(exit 1)")
    mon.mkdir(parents=True)
    (mon / "do_not_requeue.json").write_text(json.dumps({"reason": "budget", "job_id": "77"}))
    env = dict(os.environ, SLURM_JOB_ID="77")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, timeout=60)
    assert out.returncode == EXIT_DO_NOT_REQUEUE
    assert fake.actions() == []


def test_setup_lines_give_each_batch_script_its_own_session_so_a_fresh_record_of_the_job_before_is_ignored(
        tmp_path, fake):
    # Job 76 hit a full disk in this run folder a moment ago (its rank record says FAILED with
    # ENOSPC, updated now, within the clock rule's slack); job 77 resumes there and finishes:
    # its sidecar must not take 76's storage fault for its own and stop the chain (exit 79).
    script, mon = _script(tmp_path, 'echo "$TULU_MONITOR_SESSION" > "$TULU_MONITOR_DIR/session"\n'
                                    "sleep 2  # srun: the ranks train and exit 0")
    subprocess.run([sys.executable, "-c", (
        "import errno, sys; from monitoring.progress import ProgressTracker, storage_detail\n"
        "t = ProgressTracker(sys.argv[1], 0, 1, install_hooks=False, flight_recorder=False, "
        "session='76.1234.1796600000000000000')\n"
        "e = OSError(errno.ENOSPC, 'No space left on device', sys.argv[1] + '/step_20.tmp')\n"
        "t.exit(1, error=f'StorageFullError: {e}', detail=storage_detail(e)); t.close()"), str(mon)],
        check=True, cwd=ROOT, timeout=60)
    env = dict(os.environ, SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (out.stderr, (mon / "monitor_77_0.log").read_text())
    session = (mon / "session").read_text().strip()
    assert session.startswith("77.") and session != "76.1234.1796600000000000000"
    assert [e["action"] for e in read_decisions(mon)] == ["none"] and fake.actions() == []


def test_setup_lines_quote_every_path_and_use_this_python():
    lines = setup_lines("/x/it's here", 8, CFG, python="/opt/py 3/bin/python")
    text = "\n".join(lines)
    assert "'/opt/py 3/bin/python' -m monitoring.sidecar" in text
    assert "--monitor-dir '/x/it'\"'\"'s here' --world-size 8" in text
    assert setup_lines("/m", 1)[0].startswith("#") and sys.executable in "\n".join(
        setup_lines("/m", 1))


# ---------------------------------------------------------------- in-job restart on spare nodes
def _restart(attempt, kind="hang", step=5):
    return {"job_id": "77", "attempt": attempt, "action": "restart", "fault_kind": kind, "step": step}


def test_a_fault_restarts_in_the_job_while_a_spare_is_left_and_requeues_without_one():
    d = decide([], job_id="77", attempt=0, fault_kind="hang", step=5, cfg=CFG, spares_left=1,
               spares_needed=1)
    assert d.action == "restart" and "1/3" in d.reason
    crash = decide([], job_id="77", attempt=0, fault_kind="crash", step=5, cfg=CFG, spares_left=1)
    assert crash.action == "restart"          # no culprit node known: restart on the same nodes
    h = [_restart(0)]
    none_left = decide(h, job_id="77", attempt=1, fault_kind="hang", step=9, cfg=CFG, spares_left=0)
    assert none_left.action == "requeue" and "no spare node left" in none_left.reason
    two_culprits = decide([], job_id="77", attempt=0, fault_kind="hang", step=5, cfg=CFG,
                          spares_left=1, spares_needed=2)
    assert two_culprits.action == "requeue"   # one spare cannot replace two nodes
    # A time limit or a preemption ends the allocation: Slurm's to requeue, not ours to restart.
    assert decide([], job_id="77", attempt=0, fault_kind="timeout", step=5, cfg=CFG,
                  spares_left=1).action == "requeue"


def test_the_same_fault_again_after_an_in_job_restart_is_requeued_and_after_a_requeue_stopped():
    h = [_restart(0)]
    again = decide(h, job_id="77", attempt=1, fault_kind="hang", step=5, cfg=CFG, spares_left=1)
    assert again.action == "requeue" and "again after the in-job restart" in again.reason
    h.append({"job_id": "77", "attempt": 1, "action": "requeue", "fault_kind": "hang", "step": 5})
    stop = decide(h, job_id="77", attempt=2, fault_kind="hang", step=5, cfg=CFG, spares_left=1)
    assert stop.action == "stop" and "no progress" in stop.reason


def test_restarts_and_requeues_share_one_budget():
    cfg = MonitorConfig(max_restarts=2)
    h = [_restart(0, step=3), {"job_id": "77", "attempt": 1, "action": "requeue",
                               "fault_kind": "crash", "step": 6}]
    d = decide(h, job_id="77", attempt=2, fault_kind="hang", step=9, cfg=cfg, spares_left=1)
    assert d.action == "stop" and "budget exhausted" in d.reason


def test_in_job_restart_swaps_the_culprit_node_for_a_spare_and_bumps_the_attempt(tmp_path, fake):
    from monitoring import injob

    mon = tmp_path / "mon"
    assert injob.start(mon, "77", ["n1", "n2", "n3"], 2, 0)["attempt"] == 0
    killed = []
    d = handle_fault(mon, job_id="77", attempt=0, fault_kind="hang", step=5, cfg=CFG,
                     culprit_nodes=["n2"], culprit_ranks=[3], by="test", job_running=True,
                     may_restart=True, stop_step=lambda: killed.append("step 77.1") or killed)
    assert d.action == "restart" and d.exclude_nodes == ("n2",)
    assert fake.actions() == []                       # no requeue, no scancel
    assert (mon / "injob" / "77.nodes").read_text().strip() == "n1,n3"
    assert (mon / "injob" / "77.attempt").read_text().strip() == "1"
    rec = [e for e in read_decisions(mon) if e["action"] == "restart"]
    assert rec[0]["killed"] == ["step 77.1"] and rec[0]["next_attempt"] == 1
    # The step loop's verdict after the killed step: start the next one (exit 80).
    assert decide_on_exit(137, mon, 4, CFG, job_id="77", attempt=0, may_restart=True) == 80
    # Attempt 1 meets a fault on the spare: none left, so the job is requeued.
    d = handle_fault(mon, job_id="77", attempt=1, fault_kind="hang", step=9, cfg=CFG,
                     culprit_nodes=["n3"], culprit_ranks=[3], by="test", job_running=True,
                     may_restart=True, stop_step=lambda: [])
    assert d.action == "requeue" and "no spare node left" in d.reason
    assert fake.actions()[0] == "scontrol requeuehold 77"
    # The requeued allocation starts one attempt above the last one used, with its own spare.
    state = injob.start(mon, "77", ["n1", "n2", "n4"], 2, 1)
    assert (state["attempt"], state["active"], state["spares"]) == (2, ["n1", "n2"], ["n4"])


def test_the_exit_trap_never_restarts_a_job_whose_batch_script_is_ending(tmp_path, fake):
    from monitoring import injob

    mon = tmp_path / "mon"
    injob.start(mon, "77", ["n1", "n2", "n3"], 2, 0)
    d = handle_fault(mon, job_id="77", attempt=0, fault_kind="crash", step=5, cfg=CFG,
                     culprit_nodes=["n2"], culprit_ranks=[3], by="on_exit", job_running=False)
    assert d.action == "requeue" and fake.actions()[0] == "scontrol requeuehold 77"


def test_the_step_loop_restarts_a_crashed_step_on_the_spare_in_bash(tmp_path, fake):
    # The batch script's lines with a fake srun: the first training step crashes (task 3 on
    # n2), the loop's on_exit --may-restart swaps n2 for the spare n3, the second step runs
    # there with the next attempt and exits 0; no scontrol requeue anywhere.
    from monitoring.recovery import step_loop_lines

    mon = tmp_path / WEIRD
    calls = tmp_path / "srun_calls"
    srun = fake.bin / "srun"
    srun.write_text(f"""#!/bin/bash
[[ " $* " == *" --overlap "* ]] && exit 0     # the agents' step
echo "$TULU_ATTEMPT $*" >> "{calls}"
if [[ $(wc -l < "{calls}") -eq 1 ]]; then
  echo "srun: error: n2: task 3: Exited with exit code 3" >> "$TULU_MONITOR_DIR/77_0_log.err"
  exit 3
fi
exit 0
""")
    srun.chmod(0o755)
    cfg = dataclasses.replace(CFG, log_globs=[str(mon / "*_log.err")])
    lines = setup_lines(mon, 4, cfg, train_nodes=2, spare_nodes=1)
    lines += step_loop_lines("srun --unbuffered python -m train", mon, nodes=2, tasks_per_node=2)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n" + "\n".join(lines) + "\n")
    env = dict(os.environ, SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0", SLURM_JOB_NODELIST="n[1-3]",
               SLURM_JOB_NUM_NODES="3")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    steps = calls.read_text().splitlines()
    assert steps == ["0 --nodes=2 --ntasks=4 --ntasks-per-node=2 --nodelist=n1,n2 --unbuffered python -m train",
                     "1 --nodes=2 --ntasks=4 --ntasks-per-node=2 --nodelist=n1,n3 --unbuffered python -m train"]
    assert [(e["attempt"], e["action"]) for e in read_decisions(mon) if e["action"] != "none"] == \
        [(0, "restart")]
    assert not [c for c in fake.calls() if "requeue" in c]
    assert "attempt 1 of job 77 starts in the job on n1,n3" in out.stderr


def test_an_in_job_restart_kills_the_training_step_and_spares_the_agents_step(monkeypatch):
    from monitoring import slurm
    from monitoring.recovery import AGENTS_STEP

    calls = []

    def run(args, timeout=60.0):
        calls.append(args)
        return "77.0 tulu-monitor-agents\n77.1 rlvr\n77.batch batch\n77.extern extern\n" \
            if args[0] == "squeue" else ""

    monkeypatch.setattr(slurm, "run", run)
    assert slurm.kill_steps("77", skip_names=(AGENTS_STEP,)) == ["77.1"]
    assert [c for c in calls if c[0] == "scancel"] == [["scancel", "--signal=KILL", "77.1"]]
    calls.clear()
    assert slurm.kill_steps("77") == ["77.0", "77.1"]      # a requeue ends every step
