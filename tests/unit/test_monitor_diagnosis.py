"""Naming the culprit: from records, stacks and the verdicts NCCL/gloo/srun left in the logs;
and the report that `tulu status` reads back."""

from __future__ import annotations

from monitoring.config import MonitorConfig
from monitoring.detect import Fault
from monitoring.diagnosis import diagnose, load_last_report, name_culprits, write_report
from monitoring.logscan import scan_logs, scan_text, srun_failed_tasks
from monitoring.record import STATE_FAILED, STATE_RUNNING, RankRecord
from monitoring.stacks import RankStack, innermost_frame


def rec(rank, phase="train", step=3, done=2, **kw) -> RankRecord:
    base = dict(rank=rank, world_size=4, pid=1000 + rank, attempt=0, proc_start=0.0,
                host="h", node=f"n{rank // 2}", role="", phase=phase, phase_step=step,
                phase_start=100.0, updated=100.0, done_step=done, done_time=100.0,
                max_step_gap=0.0, n_steps=0, state=STATE_RUNNING, exit_code=0, exit_time=0.0,
                error="", phase_stats={})
    base.update(kw)
    return RankRecord(**base)


HANG = Fault("hang", (0, 1, 2), phase="train", step=3)

FH_COLLECTIVE = """Thread 0x00007f00 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f01 (most recent call first):
  File "/x/torch/distributed/distributed_c10d.py", line 3252 in all_reduce
  File "/x/torch/distributed/c10d_logger.py", line 83 in wrapper
  File "/x/train.py", line 10 in main
"""
FH_SLEEP = FH_COLLECTIVE.replace("distributed_c10d.py\", line 3252 in all_reduce",
                                 "data.py\", line 7 in next_batch")


def test_rank_not_in_the_phase_everyone_waits_in_is_the_culprit():
    records = [rec(0), rec(1), rec(2), rec(3, phase="", done=2)]
    (c,) = name_culprits(HANG, records)
    assert (c.rank, c.node) == (3, "n1") and "not in phase 'train'" in c.reason


def test_rank_in_the_phase_at_an_earlier_step_is_the_culprit():
    records = [rec(0), rec(1, step=2), rec(2), rec(3)]
    assert [c.rank for c in name_culprits(HANG, records)] == [1]


def test_stopped_process_is_the_culprit_even_when_records_agree():
    records = [rec(r) for r in range(4)]
    stacks = {r: RankStack(r, "faulthandler", FH_COLLECTIVE, proc_state="S (sleeping)")
              for r in range(4)}
    stacks[2] = RankStack(2, "proc", proc_state="T (stopped)")
    (c,) = name_culprits(HANG, records, stacks)
    assert c.rank == 2 and "stopped" in c.reason


def test_stack_minority_names_the_rank_that_skipped_the_collective():
    records = [rec(r) for r in range(4)]
    stacks = {r: RankStack(r, "faulthandler", FH_COLLECTIVE, proc_state="S") for r in range(4)}
    stacks[1] = RankStack(1, "faulthandler", FH_SLEEP, proc_state="S")
    (c,) = name_culprits(HANG, records, stacks)
    assert c.rank == 1 and "data.py:next_batch" in c.reason
    assert "distributed_c10d.py:all_reduce" in c.reason


def test_no_culprit_when_every_rank_waits_in_the_same_place():
    records = [rec(r) for r in range(4)]
    stacks = {r: RankStack(r, "faulthandler", FH_COLLECTIVE, proc_state="S") for r in range(4)}
    assert name_culprits(HANG, records, stacks) == []


def test_innermost_frame_skips_helper_threads_and_reads_py_spy_too():
    assert innermost_frame(FH_COLLECTIVE) == "distributed_c10d.py:all_reduce"
    spy = 'Thread 7 (idle): "MainThread"\n    _fire (monitoring/faults.py:129)\n    main (d.py:1)\n'
    assert innermost_frame(spy) == "faults.py:_fire"


def test_crash_blames_own_error_over_the_peers_communication_errors():
    crash = Fault("crash", (0, 1))
    records = [rec(0, state=STATE_FAILED, exit_code=1, exit_time=5.0,
                   error="RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
               rec(1, state=STATE_FAILED, exit_code=1, exit_time=6.0, error="KeyError: 'x'"),
               rec(2), rec(3)]
    assert [c.rank for c in name_culprits(crash, records)] == [1]


def test_crash_blames_the_vanished_rank_when_peers_only_saw_connection_errors():
    crash = Fault("crash", (0, 3))
    records = [rec(0, state=STATE_FAILED, exit_code=1, error="DistBackendError: NCCL error"),
               rec(1), rec(2), rec(3)]
    (c,) = name_culprits(crash, records, alive={0: False, 1: True, 2: True, 3: False})
    assert c.rank == 3 and "vanished" in c.reason


def test_crash_falls_back_to_srun_first_failed_task():
    log = ("srun: error: n2: task 3: Exited with exit code 3\n"
           "srun: Terminating StepId=12.0\n"
           "srun: error: n1: tasks 0-2: Killed\n")
    findings = scan_text(log, "/logs/12_0_log.err")
    assert srun_failed_tasks(findings)[0] == (3, "n2", "Exited with exit code 3")
    (c,) = name_culprits(Fault("crash", ()), [rec(r) for r in range(4)], findings=findings)
    assert (c.rank, c.node) == (3, "n2")


def test_nccl_and_gloo_verdicts_are_found_with_their_rank(tmp_path):
    (tmp_path / "7_3_log.err").write_text(
        "noise\n[rank3]:[E1127 01:02:03 ProcessGroupNCCL.cpp:632] [PG ID 0 PG GUID 0(default_pg) "
        "Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, "
        "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600012 "
        "milliseconds before timing out.\n"
        "[Rank 3] ProcessGroupNCCL's watchdog got stuck for 480 seconds without making progress\n")
    (tmp_path / "7_1_log.err").write_text(
        "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
        "waiting 1800000ms for recv operation to complete\n")
    found = scan_logs([str(tmp_path / "*_log.err")])
    kinds = {(f.kind, f.rank) for f in found}
    assert kinds == {("nccl_watchdog_timeout", 3), ("nccl_watchdog_stuck", 3),
                     ("gloo_timeout", 1)}
    nccl = next(f for f in found if f.kind == "nccl_watchdog_timeout")
    assert nccl.fields == {"seq": "5", "op": "ALLREDUCE", "ms": "600012"}


def test_report_is_written_as_json_and_text_and_read_back(tmp_path):
    records = [rec(0), rec(1), rec(2), rec(3, phase="", done=2)]
    report = diagnose(HANG, records, monitor_dir=tmp_path, cfg=MonitorConfig(), collect=False)
    path = write_report(tmp_path, report)
    assert path.exists() and path.with_suffix(".txt").exists()
    last = load_last_report(tmp_path)
    assert last["culprits"][0]["rank"] == 3 and last["culprit_nodes"] == ["n1"]
    text = (tmp_path / "last_report.txt").read_text()
    assert "HANG detected" in text and "rank 3 on n1" in text
    assert load_last_report(tmp_path / "nowhere") is None


def test_exit_trap_blames_srun_first_failed_task_of_the_current_attempt():
    """A SIGKILLed rank is reported "Killed" before its peers exit 1 on connection errors, and
    the batch log keeps earlier attempts' lines (appended across requeues)."""
    from monitoring.logscan import scan_text, srun_failed_tasks

    log = ("srun: error: n4: task 7: Exited with exit code 3\n"
           "slurmstepd-n1: error: *** JOB 9 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO JOB REQUEUE ***\n"
           "srun: error: n3: task 5: Killed\nsrun: error: n4: task 6: Exited with exit code 1\n")
    assert srun_failed_tasks(scan_text(log, "9_0_log.err"))[:1] == [(5, "n3", "Killed")]


def test_exit_trap_ignores_an_earlier_attempts_srun_lines_when_slurm_wrote_no_requeue_line():
    """slurmstepd writes "CANCELLED ... DUE TO JOB REQUEUE" only if it still finds the batch script
    running; under load the EXIT trap may have ended first. The monitor's own start line of each
    attempt separates the attempts then."""
    from monitoring.logscan import scan_text, srun_failed_tasks

    log = ("tulu-hpc monitor: attempt 0 of job 9 starts\n"
           "srun: error: n3: task 5: Killed\nsrun: error: n1: task 0: Exited with exit code 1\n"
           "tulu-hpc monitor: attempt 1 of job 9 starts\n"
           "srun: error: n4: task 7: Killed\nsrun: error: n3: task 4: Exited with exit code 1\n")
    assert srun_failed_tasks(scan_text(log, "9_0_log.err"))[:1] == [(7, "n4", "Killed")]
