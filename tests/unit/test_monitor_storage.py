"""A full, over-quota, read-only or failing run folder: the monitor names it (path, errno, bytes),
never dies of it, never requeues into it, and keeps its records in a fallback folder.

Real file systems where it matters: a small tmpfs (we are root) filled by the `enospc` fault."""

from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path

import pytest

from monitoring import storage
from monitoring.config import MonitorConfig
from monitoring.diagnosis import load_last_report, storage_fault_of
from monitoring.faults import fill_file_system, parse_faults
from tests.fs_helpers import mounted_tmpfs
from monitoring.on_exit import _decide_safely, decide_on_exit
from monitoring.progress import ProgressTracker, storage_detail
from monitoring.record import read_all
from monitoring.recovery import EXIT_DO_NOT_REQUEUE, decide, handle_fault, read_decisions, stop_reason
from monitoring.sidecar import Sidecar

from test_monitor_recovery import FakeSlurm  # noqa: E402  (tests/unit is on sys.path)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    f = FakeSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{f.bin}{os.pathsep}{os.environ['PATH']}")
    return f


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs (unmounted afterwards); skipped where mounting is not allowed."""
    with mounted_tmpfs(tmp_path / "small_fs", "2m") as mnt:
        yield mnt


@pytest.fixture(autouse=True)
def _fresh_files(monkeypatch, tmp_path):
    """Every test starts with an unconfigured monitor file store whose fallback is in tmp_path."""
    monkeypatch.setattr(storage, "files", storage.MonitorFiles(None, tmp_path / "default_fallback"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    import monitoring.recovery as recovery

    monkeypatch.setattr(recovery, "_unwritten", [])


def _tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp") if p.is_file()]


# ---------------------------------------------------------------- naming the fault
@pytest.mark.parametrize("err,name", [(errno.ENOSPC, "ENOSPC"), (errno.EDQUOT, "EDQUOT"),
                                      (errno.EROFS, "EROFS"), (errno.EIO, "EIO")])
def test_storage_errnos_are_named_through_the_exception_chain(err, name):
    try:
        try:
            raise OSError(err, os.strerror(err), "/runs/x/checkpoints/step_40.tmp/model/0.distcp")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file") from inner
    except RuntimeError as e:
        fault = storage.fault_from_exception(e)
    assert fault is not None and fault.name == name and fault.errno == err
    assert fault.path.endswith("step_40.tmp/model/0.distcp")
    assert name in fault.line() and "step_40.tmp" in fault.line()


def test_other_errors_are_not_storage_faults():
    assert storage.fault_from_exception(FileNotFoundError(errno.ENOENT, "gone", "/x")) is None
    assert storage.fault_from_exception(RuntimeError("boom")) is None
    assert storage.fault_from_text("RuntimeError: shape mismatch [Errno 2] No such file") is None


def test_recorded_errors_and_log_lines_name_the_fault_and_the_path():
    f = storage.fault_from_text("OSError: [Errno 28] No space left on device: '/r/checkpoints/step_2.tmp'")
    assert (f.name, f.path) == ("ENOSPC", "/r/checkpoints/step_2.tmp")
    assert storage.fault_from_text("OSError: [Errno 122] Disk quota exceeded").name == "EDQUOT"
    assert storage.fault_from_text("write failed: Read-only file system").name == "EROFS"
    detail = json.dumps({"errno": 28, "name": "ENOSPC", "path": "/r/c", "needed_bytes": 5, "free_bytes": 1})
    f = storage.fault_from_text(detail)
    assert (f.path, f.needed_bytes, f.free_bytes) == ("/r/c", 5, 1)


def test_a_ranks_excepthook_records_path_errno_and_bytes_and_the_diagnosis_names_them(tmp_path):
    mon = tmp_path / "mon"
    t = ProgressTracker(mon, 0, 2, install_hooks=False, flight_recorder=False)
    e = OSError(errno.ENOSPC, "checkpoint step 40 needs ~12 MB", str(tmp_path / "ck" / "step_40.tmp"))
    e.needed_bytes, e.free_bytes, e.what = 12_000_000, 3_000, "checkpoint step 40"
    t.exit(1, error=f"StorageFullError: {e}", detail=storage_detail(e))
    t.close()
    records = read_all(mon, 2)
    found, ranks = storage_fault_of(records)
    assert ranks == [0] and found.name == "ENOSPC" and found.path.endswith("step_40.tmp")
    assert (found.needed_bytes, found.free_bytes) == (12_000_000, 3_000)
    assert "needs 12.0 MB, 3.0 KB free" in found.line()


# ---------------------------------------------------------------- the policy
def test_the_policy_never_requeues_into_a_full_file_system_and_says_how_to_resume():
    d = decide([], job_id="77", attempt=0, fault_kind="storage", step=20, cfg=MonitorConfig(),
               storage_line="ENOSPC (No space left on device) writing /r/step_20.tmp")
    assert d.action == "stop"
    assert "ENOSPC" in d.reason and "not requeued" in d.reason and "resubmit" in d.reason
    d = decide([], job_id="77", attempt=0, fault_kind="storage", step=20,
               cfg=MonitorConfig(on_storage_fault="hold"), storage_line="EDQUOT ...")
    assert d.action == "hold" and "scontrol release 77" in d.reason


def test_a_storage_stop_puts_the_reason_in_the_job_comment_and_neither_requeues_nor_cancels(tmp_path, fake):
    mon = tmp_path / "mon"
    d = handle_fault(mon, job_id="77", attempt=0, fault_kind="storage", step=20, cfg=MonitorConfig(),
                     culprit_nodes=[], culprit_ranks=[0], by="test", job_running=True,
                     storage_line="ENOSPC (No space left on device) writing /r/step_20.tmp")
    assert d.action == "stop"
    acts = fake.actions()
    assert len(acts) == 1 and acts[0].startswith("scontrol update JobId=77 Comment=tulu monitor: storage: ENOSPC")
    assert stop_reason(mon, "77").startswith("storage: ENOSPC")


def test_hold_requeues_the_job_held(tmp_path, fake):
    d = handle_fault(tmp_path / "mon", job_id="77", attempt=0, fault_kind="storage", step=20,
                     cfg=MonitorConfig(on_storage_fault="hold"), by="test", storage_line="EIO x")
    assert d.action == "hold" and fake.actions()[-1] == "scontrol requeuehold 77"


# ---------------------------------------------------------------- the monitor survives
def _failing_primary(monkeypatch, primary: Path, err: int = errno.ENOSPC):
    """Writes under ``primary`` fail with ``err`` (as on a full disk), elsewhere they work."""
    real_atomic, real_append = storage._atomic_write, storage._append

    def guard(real):
        def op(path, data):
            if primary in Path(path).absolute().parents:
                raise OSError(err, os.strerror(err), str(path))
            return real(path, data)
        return op

    monkeypatch.setattr(storage, "_atomic_write", guard(real_atomic))
    monkeypatch.setattr(storage, "_append", guard(real_append))


def test_writes_fall_back_when_the_monitor_dir_refuses_them(tmp_path, monkeypatch):
    mon, fb = tmp_path / "mon", tmp_path / "fb"
    mon.mkdir()
    _failing_primary(monkeypatch, mon, errno.EROFS)
    io = storage.MonitorFiles(mon, fb, retry_wait_s=0)
    assert io.write_text(mon / "reports" / "r.json", "{}") == fb / "reports" / "r.json"
    assert io.read_text(mon / "reports" / "r.json") == "{}"
    assert io.append_line(mon / "decisions.jsonl", "a\n") == fb / "decisions.jsonl"
    assert [f["name"] for f in io.failures] == ["EROFS", "EROFS"]
    assert _tmp_leftovers(mon) == []


def test_the_sidecar_keeps_its_learned_timeouts_in_memory_when_no_place_takes_them(tmp_path, monkeypatch):
    mon = tmp_path / "mon"
    mon.mkdir()
    _failing_primary(monkeypatch, tmp_path)          # the fallback (under tmp_path) fails too
    storage.configure(mon, tmp_path / "fb", "5")
    side = Sidecar(mon, 1, MonitorConfig(), job_id="5")
    side.detector.observed["train"] = (1.0, 3)
    side._save_learned()                               # must not raise
    side._save_learned()
    assert not (mon / "learned_timeouts.json").exists() and _tmp_leftovers(tmp_path) == []


def test_the_exit_trap_returns_srun_status_when_deciding_fails(tmp_path, monkeypatch):
    import monitoring.on_exit as on_exit

    def boom(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(on_exit, "decide_on_exit", boom)
    assert _decide_safely(3, tmp_path, 2, MonitorConfig(), job_id="5", attempt=0) == 3


def test_on_a_full_run_folder_the_exit_trap_reports_enospc_in_the_fallback_and_stops(small_fs, tmp_path, fake):
    """The acceptance story on a real file system: a rank failed with ENOSPC, then the disk is
    full for the monitor too."""
    mon = small_fs / "run" / "monitor"
    t = ProgressTracker(mon, 0, 2, install_hooks=False, flight_recorder=False)
    t2 = ProgressTracker(mon, 1, 2, install_hooks=False, flight_recorder=False)
    t.step_done(20)
    t2.step_done(20)
    path = small_fs / "run" / "checkpoints" / "step_40.tmp"
    e = OSError(errno.ENOSPC, "checkpoint step 40 failed while writing", str(path))
    e.needed_bytes = 1_500_000
    assert fill_file_system(small_fs / "run") > 0
    t.exit(1, error=f"StorageFullError: {e}", detail=storage_detail(e))
    t2.exit(1, error="RuntimeError: Connection closed by peer")
    storage.configure(mon, tmp_path / "fallback", "77")

    rc = decide_on_exit(1, mon, 2, MonitorConfig(fallback_dir=str(tmp_path / "fallback")), job_id="77", attempt=0)

    assert rc == EXIT_DO_NOT_REQUEUE
    report = load_last_report(mon, fallback_dir=str(tmp_path / "fallback"), job_id="77")
    assert report is not None and report["kind"] == "storage"
    assert report["storage"]["fault"]["name"] == "ENOSPC" and report["storage"]["fault"]["path"] == str(path)
    assert report["storage"]["fault"]["free_bytes"] == 0 and report["culprit_nodes"] == []
    assert report["storage"]["monitor_write_failures"], "the monitor's own failed writes are named"
    assert "ENOSPC" in report["summary"] and str(path) in report["summary"]
    assert [d["action"] for d in read_decisions(mon) if d["action"] != "none"] == ["stop"]
    assert not any(a.startswith(("scontrol requeue", "scancel")) for a in fake.actions())
    assert _tmp_leftovers(small_fs) == []


# ---------------------------------------------------------------- fault injection
def test_the_enospc_fault_fills_the_run_folders_file_system_until_it_refuses(small_fs):
    (spec,) = parse_faults("kind=enospc,rank=0,step=20,point=checkpoint_write")
    assert (spec.kind, spec.point, spec.step) == ("enospc", "checkpoint_write", 20)
    written = fill_file_system(small_fs)
    assert 1_500_000 < written <= 2 * 1024 * 1024
    assert os.statvfs(small_fs).f_bavail == 0
    with pytest.raises(OSError) as e:
        (small_fs / f"x{uuid.uuid4().hex}").write_bytes(b"x" * 8192)
    assert e.value.errno == errno.ENOSPC


def test_records_left_by_an_earlier_job_in_the_same_run_folder_are_not_this_jobs(tmp_path, monkeypatch):
    # A resubmission starts at attempt 0 again: the failed records of the job before it must not
    # read as a crash of the new one.
    mon = tmp_path / "mon"
    t = ProgressTracker(mon, 0, 1, install_hooks=False, flight_recorder=False)
    t.exit(1, error="StorageFullError: [Errno 28] ...")
    t.close()
    assert read_all(mon, 1)[0] is not None
    import time as _time

    monkeypatch.setenv("TULU_MONITOR_START", str(_time.time() + 10))
    side = Sidecar(mon, 1, MonitorConfig(), job_id="6")
    assert side.check_once() == [] and read_all(mon, 1, since=_time.time() + 10) == [None]


def test_a_failed_record_of_the_job_before_is_not_this_jobs_even_when_it_is_a_second_old(
        tmp_path, monkeypatch):
    # A resubmission can start within the clock rule's slack of the last job's final record
    # updates (CI: a stale ENOSPC record made the resumed job's sidecar stop it, exit 79): the
    # session stamp tells the two apart, whatever the clocks say.
    import time as _time

    mon = tmp_path / "mon"
    t = ProgressTracker(mon, 0, 1, install_hooks=False, flight_recorder=False, session="206.11.1")
    t.exit(1, error="StorageFullError: [Errno 28] ...")
    t.close()
    now = _time.time()
    assert read_all(mon, 1, since=now)[0] is not None               # the clock alone: this job's
    assert read_all(mon, 1, since=now, session="207.12.2") == [None]
    assert read_all(mon, 1, since=now + 60, session="206.11.1")[0].session == "206.11.1"
    monkeypatch.setenv("TULU_MONITOR_START", str(int(now)))
    monkeypatch.setenv("TULU_MONITOR_SESSION", "207.12.2")
    assert Sidecar(mon, 1, MonitorConfig(), job_id="207").check_once() == []
    monkeypatch.setenv("TULU_MONITOR_SESSION", "206.11.1")     # its own job does see the crash
    assert [f.kind for f in Sidecar(mon, 1, MonitorConfig(), job_id="206").check_once()] == ["crash"]


def test_the_exit_trap_removes_zero_byte_temp_files_a_full_disk_left_in_the_log_folder(tmp_path):
    from monitoring.on_exit import _remove_empty_temp_files

    logs = tmp_path / "logs" / "77"
    logs.mkdir(parents=True)
    (logs / "77_0_result.pkl.save_tmp").write_bytes(b"")
    (logs / "77_0_log.err").write_bytes(b"")                 # an empty log is kept
    (logs / "77_1_result.pkl.save_tmp").write_bytes(b"data")  # not empty: kept
    cfg = MonitorConfig(log_globs=[str(tmp_path / "logs" / "{job_id}" / "*_log.*")])
    assert _remove_empty_temp_files(cfg, "77") == [str(logs / "77_0_result.pkl.save_tmp")]
    assert sorted(p.name for p in logs.iterdir()) == ["77_0_log.err", "77_1_result.pkl.save_tmp"]


def test_a_session_longer_than_the_record_field_still_recognises_its_own_records(tmp_path):
    # the field holds 64 bytes: a longer session (a site's job ids, a longer clock) is stored cut,
    # and the reader compares with the same cut, so its own ranks are not taken for a stranger's
    from monitoring.record import session_stamp

    mon = tmp_path / "mon"
    long_session = "9" * 50 + ".4242." + "1796600000123456789"
    t = ProgressTracker(mon, 0, 1, install_hooks=False, flight_recorder=False, session=long_session)
    t.close()
    rec = read_all(mon, 1, since=0.0, session=long_session)[0]
    assert rec is not None and rec.session == session_stamp(long_session) != long_session
    assert len(rec.session.encode()) == 64
    assert read_all(mon, 1, since=0.0, session="207.12.2") == [None]
