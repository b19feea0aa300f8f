"""A run folder on a small file system that fills during a save, through the real local Slurm.

The tiny SFT job's run folder is a 40 MB tmpfs; the `enospc` fault fills it inside the second
save (after the free-space check passed). The job must end FAILED with exit 79 and a report
naming ENOSPC and the path (in the fallback folder: the run folder takes no more bytes),
`tulu status` and `tulu logs` must say so in one line, the monitor log must hold no traceback,
no zero-byte temp file may be left, every committed checkpoint must verify, `tulu plan` must warn
for the full folder, and a resubmit after freeing space must resume from the last committed step
and finish."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from monitoring.diagnosis import load_last_report
from monitoring.storage import files_for
from test_slurm_train import REPO, Runner

from tests.fs_helpers import mounted_loop_ext4, mounted_tmpfs

STEPS, INTERVAL = 30, 10
FAULT = f"kind=enospc,rank=0,step={2 * INTERVAL},point=checkpoint_write"


@pytest.fixture
def run_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "40m", required=True) as mnt:
        yield mnt


@pytest.fixture
def runner(slurm_cluster, tmp_path):
    return Runner(tmp_path)


def _why(runner: Runner, job: str, st: dict, monitor_dir: Path) -> str:
    """Everything that says why a job ended as it did: its status, the monitor's logs and
    decisions, and the tail of every rank's log."""
    parts = [runner.tulu("status", job, check=False).stdout]
    for p in sorted(monitor_dir.glob(f"*_{job}_*.log")) + [monitor_dir / "decisions.jsonl"]:
        if p.exists():
            parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
    parts.append(runner.logs(job)[-4000:])
    return "\n".join(parts)


def _committed(ck_dir: Path) -> dict[int, list[str]]:
    from tulu.checkpoint import CheckpointManager

    ck = CheckpointManager(ck_dir)
    return {step: ck.verify(path) for step, path in ck.committed()}


def test_a_run_folder_that_fills_during_a_save_is_reported_as_enospc_not_requeued_and_resumes_after_freeing_space(
        runner, run_fs, tmp_path, slurm_cluster):
    t0 = time.time()
    run_dir, fallback = run_fs / "run", tmp_path / "fallback"
    sets = ["run.name=enospc", f"run.dir={run_dir}", f"sft.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}",
            f"monitoring.fallback_dir={fallback}"]
    job = runner.submit("tiny-cpu-sft.yaml", *sets, f"cluster.env.TULU_FAULT={FAULT}")
    st = runner.wait_done(job, timeout=240)
    t_failed = time.time() - t0

    # The job ended with the monitor's "do not requeue" status, not a crash loop.
    assert st["state"] == "FAILED" and st.get("exit_code", "").startswith("79"), st
    assert int(st.get("restarts", 0)) == 0, st

    # The report names ENOSPC, the path and the bytes; the run folder had no room, so it is in the fallback.
    report = load_last_report(run_dir / "monitor", fallback_dir=str(fallback), job_id=job)
    assert report is not None and report["kind"] == "storage", report and report["summary"]
    fault = report["storage"]["fault"]
    assert fault["name"] == "ENOSPC" and fault["path"] == str(run_dir / "checkpoints" / f"step_{2 * INTERVAL}.tmp")
    assert fault["needed_bytes"] > 0 and fault["free_bytes"] == 0 and fault["mount"] == str(run_fs)
    assert report["culprit_nodes"] == []
    decisions = [json.loads(line) for line in files_for(run_dir / "monitor", fallback_dir=str(fallback), job_id=job)
                 .read_lines(run_dir / "monitor" / "decisions.jsonl")]
    stops = [d for d in decisions if d["action"] != "none"]
    assert [d["action"] for d in stops] == ["stop"], decisions
    assert stops[0]["fault_kind"] == "storage" and "not requeued" in stops[0]["reason"]
    assert "resubmit" in stops[0]["reason"]

    # `tulu status` and `tulu logs` say it in one line; so does the Slurm job's comment.
    status = runner.tulu("status", job).stdout
    print("\n" + status)
    line = next(ln for ln in status.splitlines() if ln.strip().startswith("storage:"))
    assert "ENOSPC" in line and f"step_{2 * INTERVAL}.tmp" in line, status
    assert "requeues: stopped: storage: ENOSPC" in status and "not requeued" in status
    assert runner.logs(job).splitlines()[0].startswith("==> storage fault: ENOSPC")
    comment = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert "Comment=tulu monitor: storage: ENOSPC" in comment

    # `tulu plan` warns for the full folder.
    plan = runner.tulu("plan", str(REPO / "configs" / "tiny-cpu-sft.yaml"), *[a for s in sets for a in ("--set", s)])
    assert "WARNING: the run folder's file system cannot hold this run" in plan.stdout

    # Free the space; then: no traceback in the monitor's logs, no zero-byte temp file, every
    # committed checkpoint verifies and the failed save left no step folder.
    fills = list(run_dir.glob("tulu-fault-fill.*"))
    assert fills, "the fault filled nothing"
    for f in fills:
        f.unlink()
    logs = list((run_dir / "monitor").glob(f"monitor_{job}_*.log")) + list(fallback.rglob("monitor.log"))
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "Traceback" not in text, text[-3000:]
    empty_tmp = [p for p in run_fs.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name.endswith(("tmp", ".tmp"))]
    assert empty_tmp == []
    assert not (run_dir / "checkpoints" / f"step_{2 * INTERVAL}.tmp").exists()
    assert _committed(run_dir / "checkpoints") == {INTERVAL: []}

    # A resubmit (no fault) resumes from the last committed step and finishes.
    job2 = runner.submit("tiny-cpu-sft.yaml", *sets)
    st2 = runner.wait_done(job2, timeout=240)
    assert st2["state"] == "COMPLETED", _why(runner, job2, st2, run_dir / "monitor")
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{INTERVAL}'} at step {INTERVAL}" in runner.logs(job2, "--rank", "0")
    committed = _committed(run_dir / "checkpoints")
    assert max(committed) == STEPS and all(v == [] for v in committed.values()), committed
    print(f"\nfailed job ended after {t_failed:.1f} s; resumed job done after {time.time() - t0:.1f} s in total")


@pytest.fixture
def loop_fs(tmp_path):
    """A 64 MB ext4 on a loop device (the `eio` fault makes the device fail)."""
    with mounted_loop_ext4(tmp_path, required=True) as mnt:
        yield mnt


def test_a_device_that_fails_during_the_first_save_is_reported_as_eio_and_not_requeued(runner, loop_fs, tmp_path):
    run_dir, fallback = loop_fs / "run", tmp_path / "fallback"
    job = runner.submit("tiny-cpu-sft.yaml", "run.name=eio", f"run.dir={run_dir}", f"sft.max_steps={STEPS}",
                        f"checkpoint.interval={INTERVAL}", f"monitoring.fallback_dir={fallback}",
                        f"cluster.env.TULU_FAULT=kind=eio,rank=0,step={INTERVAL},point=checkpoint_write")
    st = runner.wait_done(job, timeout=240)
    assert st["state"] == "FAILED" and st.get("exit_code", "").startswith("79") and int(st.get("restarts", 0)) == 0, st
    report = load_last_report(run_dir / "monitor", fallback_dir=str(fallback), job_id=job)
    assert report is not None and report["kind"] == "storage", report and report["summary"]
    fault = report["storage"]["fault"]
    assert fault["name"] == "EIO" and fault["path"] == str(run_dir / "checkpoints" / f"step_{INTERVAL}.tmp")
    assert "I/O errors" in report["summary"]
    line = next(ln for ln in runner.tulu("status", job).stdout.splitlines() if ln.strip().startswith("storage:"))
    assert "EIO" in line and f"step_{INTERVAL}.tmp" in line
