"""The rank-side record: what a tracker writes is what the sidecar reads, torn writes are
never accepted, and exits (clean, failed, unknown) are recorded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from monitoring.progress import STACK_DUMP_SIGNAL, ProgressTracker
from monitoring.record import (
    STATE_EXITED, STATE_FAILED, STATE_RUNNING, RecordLayout, read_record, record_path,
)

ROOT = Path(__file__).resolve().parents[2]


def test_phases_steps_and_durations_round_trip_through_the_record(tmp_path):
    t = ProgressTracker(tmp_path, 3, 8, role="training", node="n7", install_hooks=False,
                        flight_recorder=False)
    with t.phase("train", 5):
        r = read_record(record_path(tmp_path, 3))
        assert (r.rank, r.world_size, r.node, r.role, r.phase, r.phase_step) == \
            (3, 8, "n7", "training", "train", 5)
        assert r.pid == os.getpid() and r.state == STATE_RUNNING
    t.step_done(5)
    t.step_done(6)
    r = read_record(record_path(tmp_path, 3))
    assert r.phase == "" and r.done_step == 6 and r.n_steps == 2
    assert r.phase_stats["train"][1] == 1
    t.close()


def test_nested_phase_restores_the_outer_phase_and_its_start_time(tmp_path):
    t = ProgressTracker(tmp_path, 0, 1, install_hooks=False, flight_recorder=False)
    with t.phase("step", 1):
        outer = read_record(record_path(tmp_path, 0)).phase_start
        with t.phase("weight_sync", 1):
            assert read_record(record_path(tmp_path, 0)).phase == "weight_sync"
        r = read_record(record_path(tmp_path, 0))
        assert r.phase == "step" and r.phase_start == outer
    t.close()


def test_reader_rejects_a_record_caught_mid_write(tmp_path):
    t = ProgressTracker(tmp_path, 0, 1, install_hooks=False, flight_recorder=False)
    t.begin("train", 1)
    RecordLayout.SEQ.pack_into(t._mm, 0, t._seq + 1)         # odd: a writer is mid-update
    RecordLayout.PHASE.pack_into(t._mm, RecordLayout.OFF_PHASE, b"gar", 9, 0.0, 0.0)
    calls = []
    orig = os.pread

    def pread(fd, n, off):   # the "writer" finishes after the reader's first attempts
        calls.append(n)
        if len(calls) == 9:
            RecordLayout.PHASE.pack_into(t._mm, RecordLayout.OFF_PHASE, b"train", 1, 1.0, 1.0)
            RecordLayout.SEQ.pack_into(t._mm, 0, t._seq + 2)
        return orig(fd, n, off)

    os.pread = pread
    try:
        r = read_record(record_path(tmp_path, 0))
    finally:
        os.pread = orig
    assert r.phase == "train" and len(calls) > 9
    t.close()


def test_missing_record_reads_as_none(tmp_path):
    assert read_record(record_path(tmp_path, 4)) is None


def _child(tmp_path, body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        from monitoring.progress import ProgressTracker
        t = ProgressTracker({str(tmp_path)!r}, 0, 1)
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_uncaught_exception_records_a_failure_with_its_message(tmp_path):
    out = _child(tmp_path, "raise ValueError('bad batch')")
    assert out.returncode == 1
    r = read_record(record_path(tmp_path, 0))
    assert r.state == STATE_FAILED and r.exit_code == 1 and "ValueError: bad batch" in r.error


def test_explicit_exit_and_unreported_interpreter_exit_are_told_apart(tmp_path):
    _child(tmp_path, "t.exit(0)")
    r = read_record(record_path(tmp_path, 0))
    assert (r.state, r.exit_code) == (STATE_EXITED, 0)
    _child(tmp_path, "sys.exit(3)")
    r = read_record(record_path(tmp_path, 0))
    assert (r.state, r.exit_code) == (STATE_EXITED, -1)   # status unknown, not "clean"


def test_stack_dump_signal_writes_all_threads_to_the_stack_file(tmp_path):
    out = _child(tmp_path, f"""
        import os, time
        os.kill(os.getpid(), {int(STACK_DUMP_SIGNAL)})
        time.sleep(0.2)
        print(open(t.monitor_dir / "stacks" / "rank_00000.txt").read())
    """)
    assert "most recent call first" in out.stdout, out.stderr


def test_flight_recorder_variables_point_into_the_monitor_dir(tmp_path, monkeypatch):
    for k in ("TORCH_NCCL_DEBUG_INFO_PIPE_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
              "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    t = ProgressTracker(tmp_path, 2, 4, install_hooks=False)
    env = t.flight_recorder_env
    assert env["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"].startswith(str(tmp_path / "nccl_trace"))
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000"
    t.close()


def test_from_env_uses_the_setup_lines_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("TULU_MONITOR_DIR", raising=False)
    assert ProgressTracker.from_env(0, 1) is None
    monkeypatch.setenv("TULU_MONITOR_DIR", str(tmp_path))
    monkeypatch.setenv("TULU_ATTEMPT", "2")
    monkeypatch.setenv("TULU_MONITOR_SESSION", "77.4242.1796600000123456789")
    t = ProgressTracker.from_env(0, 1, install_hooks=False, flight_recorder=False)
    rec = read_record(record_path(tmp_path, 0))
    assert rec.attempt == 2 and rec.session == "77.4242.1796600000123456789"
    t.close()
