"""A job's task ends without the C++ teardown of torch.distributed/Megatron (1.5-2.5 s at the end of
every job) once submitit has stored its successful result, and only then (a failure keeps its exit
status); `tulu submit` does not import torch before the job starts."""

import atexit
import os
import subprocess
import sys
from pathlib import Path

import submitit

from tulu.launch.task import _exit_without_teardown

REPO = Path(__file__).resolve().parents[2]


def _mark_at_exit(marker: Path) -> None:
    # registered first, so it runs after _exit_without_teardown: written only by a usual exit
    atexit.register(marker.write_text, "usual exit")
    atexit.register(_exit_without_teardown)


def _returns_after_registering(marker, value):
    _mark_at_exit(marker)
    return value


def _registers_then_fails(marker):
    _mark_at_exit(marker)
    raise ValueError("the task failed")


def test_outside_a_submitit_task_it_returns_instead_of_exiting():
    assert _exit_without_teardown() is None  # this pytest process is still here


def test_a_local_task_that_exits_fast_still_delivers_its_result_and_its_failure(tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the task process cannot import this file
    ex = submitit.LocalExecutor(folder=tmp_path / "%j")
    ex.update_parameters(timeout_min=2)
    ok = ex.submit(_returns_after_registering, tmp_path / "ok.mark", {"step": 3})
    assert ok.result() == {"step": 3}
    assert not (tmp_path / "ok.mark").exists()  # exited before the rest of the teardown
    failed = ex.submit(_registers_then_fails, tmp_path / "failed.mark")
    try:
        failed.result()
        raise AssertionError("the failure was lost")
    except submitit.core.utils.FailedJobError as e:
        assert "the task failed" in str(e)
    assert (tmp_path / "failed.mark").read_text() == "usual exit"  # and with it, its exit status


def test_tulu_submit_does_not_import_torch_before_the_job_starts(tmp_path):
    probe = ("import sys\nfrom tulu.cli import main\n"
             "main(['submit', 'configs/tiny-cpu-rlvr.yaml', '--dry-run', '--set', 'cluster.executor=local',"
             f" '--set', 'run.dir={tmp_path}/run'])\n"
             "sys.modules.get('torch') is None or sys.exit('tulu submit imported torch')\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
