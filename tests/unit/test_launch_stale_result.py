"""A task's result temp file that an earlier attempt left (SIGKILLed while submitit saved its
result) is removed when the task starts: submitit refuses to save over it, and every later
attempt of that task failed at its end (the five-fault Slurm run, 2026-12-07)."""

from __future__ import annotations

import pytest
from submitit.core.utils import JobPaths, temporary_save_path

from tulu.launch.task import _drop_stale_result_temp


@pytest.fixture
def slurm_task(tmp_path, monkeypatch):
    """The environment submitit's Slurm job environment reads: task 4 of job 269."""
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(tmp_path), "SLURM_JOB_ID": "269",
                 "SLURM_PROCID": "4", "SLURM_NTASKS": "8"}.items():
        monkeypatch.setenv(k, v)
    for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    return JobPaths(tmp_path, "269", 4).result_pickle


def test_a_stale_result_temp_file_blocks_submitits_save_until_the_task_removes_it(slurm_task):
    stale = slurm_task.with_suffix(slurm_task.suffix + ".save_tmp")
    stale.write_bytes(b"half a pickle")
    other = slurm_task.with_name("269_5_result.pkl.save_tmp")       # another task's: not ours
    other.write_bytes(b"x")
    with pytest.raises(AssertionError, match="temporary saved file already exists"):
        with temporary_save_path(slurm_task):
            pass
    assert _drop_stale_result_temp() == stale
    assert not stale.exists() and other.exists()
    with temporary_save_path(slurm_task) as tmp:
        tmp.write_bytes(b"result")
    assert slurm_task.read_bytes() == b"result"
    assert _drop_stale_result_temp() is None                       # nothing left to remove


def test_outside_submitit_nothing_happens(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    assert _drop_stale_result_temp() is None
