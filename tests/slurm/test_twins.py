"""A preset is a promise: every config in configs/ has a miniature twin (tulu twin, derived by
code) that runs the real path on the local Slurm through `tulu submit` - model build with the
preset's structural features, steps, checkpoints, a crash on the last rank, the requeue, the
resume - and continues as the unkilled run does (bitwise losses for SFT/DPO; RLVR: contiguous
steps, the engines generating with the trainer's weights after the resume).

The crash comes from fault injection (``exception`` at step 3, first attempt only); the EXIT trap
requeues the job and it resumes from the step-2 checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from test_slurm_train import Runner

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.name for p in (REPO / "configs").glob("tulu3-*.yaml"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


@pytest.fixture
def runner(slurm_cluster, tmp_path):
    return Runner(tmp_path)


def _submit(runner: Runner, config: Path, *sets: str) -> str:
    args = [a for s in sets for a in ("--set", s)]
    out = runner.tulu("submit", str(config), *args).stdout
    return re.search(r"submitted job (\d+)", out).group(1)


def _train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def _done(runner: Runner, job: str, timeout: float) -> dict:
    st = runner.wait_done(job, timeout=timeout)
    assert st["state"] == "COMPLETED", (st, runner.logs(job)[-6000:])
    return st


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_twin_trains_checkpoints_survives_a_crash_and_continues_as_the_unkilled_run(preset, runner):
    from tulu.twin import derive_twin, write_twin

    t0 = time.time()
    twin = derive_twin(REPO / "configs" / preset)
    config = write_twin(twin, runner.cwd / "twin")
    last_rank = twin.tasks - 1
    crash = f"cluster.env.TULU_FAULT=kind=exception,rank={last_rank},step=3,restart=0"
    timeout = 900 if twin.config["stage"] == "rlvr" else 420

    crashed = _submit(runner, config, "run.name=crashed", f"run.dir={runner.cwd}/runs/crashed", crash)
    straight = None
    if twin.config["stage"] != "rlvr":   # the unkilled run, side by side
        straight = _submit(runner, config, "run.name=straight", f"run.dir={runner.cwd}/runs/straight")
    st = _done(runner, crashed, timeout)
    assert int(st["restarts"]) == 1, st
    logs = runner.logs(crashed)
    assert "InjectedFault" in logs and "resumed from" in logs
    rows = _train_rows(runner.cwd / "runs" / "crashed")
    steps = sorted({r["step"] for r in rows})
    assert steps == [1, 2, 3, 4], steps
    ckpts = runner.cwd / "runs" / "crashed" / "checkpoints"
    assert (ckpts / "step_4" / "manifest.json").exists()

    if twin.config["stage"] == "rlvr":
        for r in rows:   # every rollout, also the first after the resume, came from the trainer's weights
            assert abs(r["sampler_kl"]) < 1e-2, r
            assert r["weight_sync_bytes"] > 0
    else:
        _done(runner, straight, timeout)
        expected = {r["step"]: r["loss"] for r in _train_rows(runner.cwd / "runs" / "straight")}
        got = {r["step"]: r["loss"] for r in rows}   # the resumed run's last record of each step
        assert got == expected, (got, expected)      # bitwise: same seed, same layout, exact resume
    peaks = [float(mb) for mb in re.findall(r"finished mode train in [\d.]+ s \(peak RSS (\d+) MB\)", logs)]
    assert peaks, "no rank reported its peak RSS"
    print(json.dumps({"twin": preset, "tasks": twin.tasks, "wall_s": round(time.time() - t0, 1),
                      "peak_rss_mb_max": max(peaks), "peak_rss_mb_median": sorted(peaks)[len(peaks) // 2]}))
