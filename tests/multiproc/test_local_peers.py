"""A local-executor job whose rank fails before the rendezvous ends in seconds, not after the
process group's 30-minute time-out (`tulu.launch.local_peers`): through `tulu submit --wait`,
submitit's local executor and the real task; and the peer rules on their own."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tulu.launch import local_peers

REPO = Path(__file__).resolve().parents[2]


def _submit(tmp_path: Path, fault: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    run = tmp_path / "run"
    sets = ["cluster.executor=local", f"run.dir={run}", "sft.max_steps=4", f"cluster.env.TULU_FAULT={fault}"]
    env = dict(os.environ, TULU_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "tulu.cli", "submit", str(REPO / "configs" / "tiny-cpu-sft.yaml"),
                        "--wait", *[x for kv in sets for x in ("--set", kv)]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    return r, time.time() - t0, run


@pytest.mark.parametrize("kind, why", [("exception", "raised an exception"),
                                       ("sigkill", "is gone without a result")])
def test_a_rank_that_fails_before_the_rendezvous_stops_its_peer_within_seconds(tmp_path, kind, why):
    r, took, run = _submit(tmp_path, f"kind={kind},rank=1,point=start")
    assert r.returncode == 1 and "FAILED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert took < 90, took                      # the time-out it waited out before: 1800 s
    (log,) = run.glob("logs/*/*_0_log.err")
    text = log.read_text()
    line = next((ln for ln in text.splitlines() if "local rank 1 " in ln), "")
    assert why in line and "rank 0 stops too" in line, text[-3000:]
    assert "(most recent call first)" in text   # where rank 0 was (importing, or in the rendezvous)


def _pickle(folder: Path, job: str, rank: int, tag: str) -> None:
    with open(folder / f"{job}_{rank}_result.pkl", "wb") as f:
        pickle.dump((tag, None), f)


def _pid_file(folder: Path, rank: int, pid: int) -> None:
    (folder / ".tasks").mkdir(exist_ok=True)
    (folder / ".tasks" / f"{rank}.pid").write_text(str(pid))


def test_a_peer_that_finished_or_has_not_started_is_left_alone_and_a_gone_one_after_the_grace(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone: dict[int, float] = {}
    assert local_peers.failed_peer(tmp_path, "9", 0, 3, gone, grace_s=3.0, now=100.0) is None  # nobody started
    _pid_file(tmp_path, 1, os.getpid())                       # alive
    _pid_file(tmp_path, 2, dead.pid)                          # gone, no result yet
    assert local_peers.failed_peer(tmp_path, "9", 0, 3, gone, grace_s=3.0, now=100.0) is None
    _pickle(tmp_path, "9", 2, "success")                      # it finished: not a failure
    assert local_peers.failed_peer(tmp_path, "9", 0, 3, gone, grace_s=3.0, now=200.0) is None
    (tmp_path / "9_2_result.pkl").unlink()
    assert local_peers.failed_peer(tmp_path, "9", 0, 3, gone, grace_s=3.0, now=102.0) is None  # in the grace
    peer, why = local_peers.failed_peer(tmp_path, "9", 0, 3, gone, grace_s=3.0, now=103.5)
    assert peer == 2 and f"process {dead.pid} is gone without a result" in why
    _pickle(tmp_path, "9", 1, "error")
    assert local_peers.failed_peer(tmp_path, "9", 0, 3, {}, now=0.0)[0] == 1


def test_the_watch_exits_with_status_1_once_a_peer_failed(tmp_path):
    codes: list[int] = []
    t = threading.Thread(target=local_peers.watch, args=(tmp_path, "9", 0, 2),
                         kwargs=dict(poll_s=0.01, exit=codes.append))
    t.start()
    time.sleep(0.1)
    assert codes == [] and t.is_alive()
    _pickle(tmp_path, "9", 1, "error")
    t.join(timeout=10)
    assert codes == [1] and not t.is_alive()
