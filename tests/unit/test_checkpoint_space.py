"""A run folder too small for its checkpoints: the plan warns and `tulu submit` refuses (with a key
to override), the trainer's save refuses before writing anything, and a save that meets a full
disk midway leaves every committed checkpoint intact and no temp files behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monitoring.faults import fill_file_system
from monitoring.progress import storage_detail
from monitoring.storage import fault_from_text
from tests.fs_helpers import mounted_loop_ext4, mounted_tmpfs

REPO = Path(__file__).resolve().parents[2]
SFT = REPO / "configs" / "tiny-cpu-sft.yaml"


@pytest.fixture(autouse=True, scope="module")
def _megatron_on_cpu():
    from tulu.models import megatron_cpu

    megatron_cpu.apply()


@pytest.fixture
def small_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "small_fs", "4m") as mnt:
        yield mnt


def _trained():
    model = torch.nn.Linear(300, 300)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 300)).sum().backward()
    opt.step()
    return model, opt


def _free_fill(folder: Path) -> None:
    for p in folder.glob("tulu-fault-fill.*"):
        p.unlink()


def test_a_save_that_cannot_fit_is_refused_before_writing_and_names_path_and_bytes(small_fs):
    from tulu.checkpoint import CheckpointManager
    from tulu.checkpoint.manager import StorageFullError

    model, opt = _trained()
    ck = CheckpointManager(small_fs / "ck", keep_last=2)
    assert 1_000_000 < ck.needed_bytes(model) < 1_300_000        # weights + Adam m, v (fp32)
    ck.save(10, model, optimizer=opt)
    fill_file_system(small_fs)
    with pytest.raises(StorageFullError) as e:
        ck.save(20, model, optimizer=opt)
    err = e.value
    assert err.errno == errno.ENOSPC and err.filename == str(small_fs / "ck" / "step_20.tmp")
    assert err.needed_bytes >= ck.last_save_stats["bytes"] and err.free_bytes == 0
    assert "nothing written" in str(err)
    assert not (small_fs / "ck" / "step_20.tmp").exists()
    detail = fault_from_text(storage_detail(err))                 # what the rank records
    assert (detail.name, detail.path, detail.free_bytes) == ("ENOSPC", err.filename, 0)
    assert ck.latest_verified() == (10, small_fs / "ck" / "step_10")


def test_a_disk_that_fills_during_a_save_leaves_committed_checkpoints_and_no_temp_files(small_fs, monkeypatch):
    from tulu.checkpoint import CheckpointManager
    from tulu.checkpoint.manager import StorageFullError

    model, opt = _trained()
    ck = CheckpointManager(small_fs / "ck", keep_last=2)
    ck.save(10, model, optimizer=opt)
    monkeypatch.setenv("TULU_RUN_DIR", str(small_fs))
    monkeypatch.setenv("TULU_FAULT", "kind=enospc,point=checkpoint_write,step=20")
    with pytest.raises(StorageFullError) as e:
        ck.save(20, model, optimizer=opt)                          # passes the check, then fills
    assert e.value.errno == errno.ENOSPC and "failed while writing" in str(e.value)
    assert sorted(p.name for p in (small_fs / "ck").iterdir()) == ["step_10"]
    assert [p for p in small_fs.rglob("*") if p.is_file() and p.stat().st_size == 0] == []
    assert ck.verify(small_fs / "ck" / "step_10") == []
    monkeypatch.delenv("TULU_FAULT")
    _free_fill(small_fs)
    ck.save(20, model, optimizer=opt)                              # space freed: saves again
    assert ck.latest_verified() == (20, small_fs / "ck" / "step_20")


def _tulu(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tulu.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TULU_HOME": str(cwd / "home")}, timeout=120)


def test_plan_prints_checkpoint_bytes_and_free_space_and_submit_refuses_a_folder_too_small(small_fs, tmp_path):
    run = f"run.dir={small_fs}/run"
    r = _tulu("plan", str(SFT), "--set", run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "checkpoint: ~1.9 MB each" in r.stdout and f"on {small_fs}: 4.2 MB free" in r.stdout
    assert "WARNING: the run folder's file system cannot hold this run" in r.stdout
    r = _tulu("submit", str(SFT), "--set", run, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "checkpoint.check_free_space" in r.stderr and "ENOSPC" not in r.stderr
    assert "needs 15.7 MB" in r.stderr
    r = _tulu("submit", str(SFT), "--set", run, "--set", "checkpoint.check_free_space=false", "--dry-run",
              cwd=tmp_path)
    assert r.returncode == 0 and "WARNING" in r.stdout and "#SBATCH" in r.stdout


def test_a_folder_with_room_passes_and_counts_checkpoints_already_there(tmp_path):
    from tulu.config.job import load_config
    from tulu.plan.layout import build_plan
    from tulu.plan.run_space import check_run_folder_space

    cfg = load_config(SFT, [f"run.dir={tmp_path}/run"])
    ck = tmp_path / "run" / "checkpoints" / "step_20"
    ck.mkdir(parents=True)
    (ck / "blob").write_bytes(b"x" * 10_000)
    space = check_run_folder_space(cfg, build_plan(cfg))
    assert space.fits and space.existing_bytes == 10_000 and space.keep_last == 2
    assert space.needed_bytes == 3 * space.checkpoint_bytes + space.log_bytes


@pytest.fixture
def loop_fs(tmp_path):
    """A 64 MB ext4 on a loop device (root); the `eio` fault makes its device fail."""
    with mounted_loop_ext4(tmp_path) as mnt:
        yield mnt


def test_a_device_that_fails_during_a_save_is_named_eio_with_its_path(loop_fs, monkeypatch, tmp_path):
    from monitoring import storage
    from monitoring.config import MonitorConfig
    from monitoring.on_exit import decide_on_exit
    from monitoring.progress import ProgressTracker
    from tulu.checkpoint import CheckpointManager
    from tulu.checkpoint.manager import StorageFullError

    model, opt = _trained()
    ck = CheckpointManager(loop_fs / "ck", keep_last=2)
    ck.save(10, model, optimizer=opt)
    monkeypatch.setenv("TULU_RUN_DIR", str(loop_fs))
    monkeypatch.setenv("TULU_FAULT", "kind=eio,point=checkpoint_write,step=20")
    with pytest.raises(StorageFullError) as e:
        ck.save(20, model, optimizer=opt)
    err = e.value
    assert err.errno == errno.EIO and err.filename == str(loop_fs / "ck" / "step_20.tmp"), err
    assert "Input/output error" in str(err)

    # The rank records it; the EXIT trap names it and does not requeue (no Slurm job: report only).
    mon = tmp_path / "mon"
    t = ProgressTracker(mon, 0, 1, install_hooks=False, flight_recorder=False)
    t.exit(1, error=f"StorageFullError: {err}", detail=storage_detail(err))
    t.close()
    monkeypatch.setattr(storage, "files", storage.MonitorFiles(mon, tmp_path / "fallback"))
    decide_on_exit(1, mon, 1, MonitorConfig(), job_id=None, attempt=0)
    report = json.loads((mon / "last_report.json").read_text())
    assert report["kind"] == "storage" and report["storage"]["fault"]["name"] == "EIO"
    assert report["storage"]["fault"]["path"] == err.filename
    assert "I/O errors" in report["summary"]
