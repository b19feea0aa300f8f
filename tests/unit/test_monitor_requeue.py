"""No lost requeue, no ghost steps: the requeue against a fake ``scontrol`` that fails on
command (slurmctld briefly unreachable), and the sidecar's SIGKILL of a hung attempt's ranks
(a SIGSTOPped one included) before it requeues, against real rank processes.

The fakes are scripts on PATH that log their argv; ``scontrol requeue``/``requeuehold`` fail
while ``<state>/fail_requeue`` holds a count above 0 (``always``: every time), and a
successful one sets Restarts=1 as Slurm does. Like Slurm, a requeue sends SIGCONT and SIGTERM
to the job's processes (the pids listed in ``<state>/pids``)."""

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

from monitoring import recovery
from monitoring.config import MonitorConfig
from monitoring.detect import Fault
from monitoring.on_exit import decide_on_exit
from monitoring.recovery import EXIT_REQUEUE_FAILED, handle_fault, read_decisions
from monitoring.record import read_all
from monitoring.sidecar import Sidecar

ROOT = Path(__file__).resolve().parents[2]
JOB = ("JobId=77 JobName=rlvr JobState=RUNNING Reason=None Requeue=1 Restarts={restarts} "
       "BatchFlag=1 NodeList=n[1-2] NumNodes=2 Partition=debug ExcNodeList=(null)")
CFG = MonitorConfig(max_restarts=3, stack_wait_s=0.3, use_py_spy=False)

FAKE = r"""#!/bin/bash
echo "{tool} $*" >> "{log}"
S="{state}"
case "{tool} $1" in
  "scontrol show") cat "$S/job" ;;
  "sinfo "*) printf 'n1 alloc\nn2 alloc\nn3 idle\nn4 idle\n' ;;
  "squeue "*) printf '77.0\n77.batch\n77.extern\n' ;;
  "scontrol requeue"|"scontrol requeuehold")
    f=$(cat "$S/fail_requeue" 2>/dev/null || echo 0)
    if [[ "$f" == always || "$f" -gt 0 ]]; then
      [[ "$f" == always ]] || echo $((f - 1)) > "$S/fail_requeue"
      echo "slurm_requeue error: Unable to contact slurm controller (connect failure)" >&2
      echo "FAILED {tool} $*" >> "{log}"
      exit 1
    fi
    sed -i 's/Restarts=0/Restarts=1/' "$S/job"
    for p in $(cat "$S/pids" 2>/dev/null); do
      st=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)   # Z: a zombie
      if [[ -n "$st" && "$st" != Z ]]; then echo "ALIVE AT REQUEUE $p" >> "{log}"; fi
      kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null
    done ;;
esac
exit 0
"""


class FailingSlurm:
    def __init__(self, root: Path) -> None:
        self.bin, self.log, self.state = root / "fakebin", root / "calls.log", root / "state"
        self.bin.mkdir()
        self.state.mkdir()
        (self.state / "job").write_text(JOB.format(restarts=0))
        for tool in ("scontrol", "sinfo", "scancel", "squeue"):
            p = self.bin / tool
            p.write_text(FAKE.format(tool=tool, log=self.log, state=self.state))
            p.chmod(0o755)

    def fail_requeue(self, times: int | str) -> None:
        (self.state / "fail_requeue").write_text(str(times))

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def requeues(self) -> list[str]:
        """Requeues Slurm accepted (a failed try is logged twice: the call, then FAILED)."""
        calls = self.calls()
        failed = [c.removeprefix("FAILED ") for c in calls if c.startswith("FAILED ")]
        tried = [c for c in calls if c.startswith(("scontrol requeue", "scontrol requeuehold"))]
        assert len(tried) >= len(failed)
        return tried[len(failed):]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FailingSlurm:
    f = FailingSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{f.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(recovery, "REQUEUE_BACKOFF_S", 0.05)
    return f


def marker(mon: Path, attempt: int = 0) -> Path:
    return mon / "requeued" / f"77_{attempt}.json"


def hang(mon: Path, nodes=(), cfg=CFG):
    return handle_fault(mon, job_id="77", attempt=0, fault_kind="hang", step=5, cfg=cfg,
                        culprit_nodes=list(nodes), culprit_ranks=[1], by="sidecar",
                        job_running=True)


# ---------------------------------------------------------------- no lost requeue
def test_a_requeue_that_fails_once_is_retried_and_made_exactly_once(tmp_path, fake):
    mon = tmp_path / "mon"
    fake.fail_requeue(1)
    d = hang(mon)
    assert d.action == "requeue", d.reason
    assert fake.requeues() == ["scontrol requeue 77"]
    assert len([c for c in fake.calls() if c.startswith("FAILED")]) == 1
    assert json.loads(marker(mon).read_text())["by"] == "sidecar"
    assert [e["action"] for e in read_decisions(mon)] == ["requeue"]


def test_a_hold_requeue_with_exclusion_that_fails_once_is_retried_then_released(tmp_path, fake):
    mon = tmp_path / "mon"
    fake.fail_requeue(1)
    d = hang(mon, nodes=("n2",))
    assert d.action == "requeue" and d.exclude_nodes == ("n2",)
    assert fake.requeues() == ["scontrol requeuehold 77"]
    assert [c for c in fake.calls() if c.startswith("scontrol") and "show" not in c][-2:] == \
        ["scontrol update JobId=77 ExcNodeList=n2", "scontrol release 77"]
    assert marker(mon).exists()


def test_a_try_that_timed_out_after_slurm_acted_is_not_repeated(tmp_path, fake, monkeypatch):
    # The client gave up, but slurmctld requeued the job (Restarts went up): no second requeue.
    from monitoring import slurm
    real = slurm.run

    def flaky(args, timeout=60.0):
        if args[:2] == ["scontrol", "requeue"] and not fake.requeues():
            real(args, timeout)
            raise slurm.SlurmCommandError("scontrol requeue 77 timed out after 60 s")
        return real(args, timeout)

    monkeypatch.setattr(slurm, "run", flaky)
    assert hang(tmp_path / "mon").action == "requeue"
    assert fake.requeues() == ["scontrol requeue 77"]
    assert marker(tmp_path / "mon").exists()


def test_a_requeue_that_always_fails_leaves_no_marker_says_why_and_the_exit_trap_still_tries(
        tmp_path, fake, capsys):
    mon = tmp_path / "mon"
    fake.fail_requeue("always")
    d = hang(mon)
    assert d.action == "requeue_failed"
    assert "REQUEUE FAILED after 4 tries" in d.reason and "Unable to contact slurm" in d.reason
    assert not marker(mon).exists()
    assert "REQUEUE FAILED" in capsys.readouterr().err
    entry = read_decisions(mon)[-1]
    assert entry["action"] == "requeue_failed" and entry["by"] == "sidecar"
    assert "requeue" not in [e["action"] for e in read_decisions(mon)]   # budget not spent
    assert not (mon / "pending_requeue" / "77_0.json").exists()
    tries = [c for c in fake.calls() if c == "scontrol requeue 77"]
    assert len(tries) == recovery.REQUEUE_TRIES

    # The EXIT trap (srun returned): its try fails too -> a status that says so ...
    assert decide_on_exit(143, mon, 2, CFG, job_id="77", attempt=0) == EXIT_REQUEUE_FAILED
    # ... and once the controller is back, the EXIT trap's requeue goes through.
    fake.fail_requeue(0)
    assert decide_on_exit(143, mon, 2, CFG, job_id="77", attempt=0) == 143
    assert fake.requeues() == ["scontrol requeue 77"]
    assert json.loads(marker(mon).read_text())["by"] == "on_exit"
    assert [e["action"] for e in read_decisions(mon)].count("requeue") == 1


def test_a_requested_requeue_that_always_fails_ends_the_job_with_a_failure_status(tmp_path, fake):
    mon = tmp_path / "mon"
    recovery.request_requeue(mon, "77", 0, "preempted: saved step 40")
    fake.fail_requeue("always")
    assert decide_on_exit(0, mon, 2, CFG, job_id="77", attempt=0) == EXIT_REQUEUE_FAILED
    assert not marker(mon).exists()
    assert read_decisions(mon)[-1]["action"] == "requeue_failed"


def test_a_requeue_whose_maker_was_killed_before_recording_it_is_recorded_by_the_next_attempt(
        tmp_path, fake, monkeypatch):
    # The EXIT trap's requeue ends the batch script; Slurm may kill what is left of the job
    # (the maker) between scontrol and the decision record.
    mon = tmp_path / "mon"

    def killed(*a, **kw):
        raise KeyboardInterrupt("SIGKILL stand-in")

    monkeypatch.setattr(recovery, "record_decision", killed)
    with pytest.raises(KeyboardInterrupt):
        hang(mon)
    monkeypatch.undo()
    assert fake.requeues() == ["scontrol requeue 77"] and read_decisions(mon) == []
    Sidecar(mon, 2, CFG, job_id="77", attempt=1)
    Sidecar(mon, 2, CFG, job_id="77", attempt=1)          # a second look records nothing more
    (entry,) = read_decisions(mon)
    assert (entry["action"], entry["attempt"], entry["by"]) == ("requeue", 0, "sidecar")
    assert entry["settled_by_attempt"] == 1
    assert not (mon / "pending_requeue" / "77_0.json").exists()


# ---------------------------------------------------------------- no ghost steps
RANK = r"""
import signal, sys, time
from monitoring.progress import ProgressTracker
signal.signal(signal.SIGTERM, signal.SIG_IGN)    # submitit-like: SIGTERM does not end a rank
t = ProgressTracker(sys.argv[1], int(sys.argv[2]), 2, install_hooks=False, flight_recorder=False)
step = 0
while True:
    t.begin("train", step); time.sleep(0.02); t.end(); t.step_done(step); step += 1
"""


def _progress(mon: Path) -> list[tuple[int, int]]:
    return [(r.done_step, r.n_steps) for r in read_all(mon, 2)]


def test_a_hang_with_a_sigstopped_rank_kills_every_rank_before_the_requeue_so_no_old_step_runs_after_it(
        tmp_path, fake):
    mon = tmp_path / "mon"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(mon), str(r)], env=env)
             for r in range(2)]
    try:
        (fake.state / "pids").write_text(" ".join(str(p.pid) for p in ranks))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                r is not None and r.n_steps >= 3 for r in read_all(mon, 2)):
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGSTOP)     # the culprit; rank 0 would go on stepping
        side = Sidecar(mon, 2, dataclasses.replace(CFG, exclude_culprit_node=False),
                       job_id="77", attempt=0)
        out = side.handle(Fault("hang", (0,), phase="train", step=3, elapsed_s=6, timeout_s=5,
                                detail="test"))
        assert out["decision"] == "requeue"
        at_decision = _progress(mon)
        for p in ranks:
            assert p.wait(timeout=10) == -signal.SIGKILL
        time.sleep(0.5)
        assert _progress(mon) == at_decision, "a rank of the requeued attempt stepped on"
        calls = fake.calls()
        assert not [c for c in calls if c.startswith("ALIVE AT REQUEUE")], calls
        assert calls.index("scancel --signal=KILL 77.0") < calls.index("scontrol requeue 77")
        entry = [e for e in read_decisions(mon) if e["action"] == "requeue"][0]
        assert {"rank 0 pid %d" % ranks[0].pid, "rank 1 pid %d" % ranks[1].pid,
                "step 77.0"} <= set(entry["killed"])
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
