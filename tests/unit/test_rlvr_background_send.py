"""The learner's background thread for weight sends (tulu.rlvr.background.Background): one daemon
thread for the run, calls in order, a failing call's error raised where its result is asked for."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tulu.rlvr.background import Background as _Background  # noqa: E402


def test_calls_run_in_turn_on_one_daemon_thread_and_errors_reach_the_caller():
    worker = _Background("weight-send-test")
    seen = []

    def call(k):
        seen.append((k, threading.current_thread()))
        return k * 10

    def fail():
        raise ConnectionError("engine gone")

    futures = [worker.submit(lambda k=k: call(k)) for k in range(5)]
    assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30, 40]
    threads = {t for _, t in seen}
    assert [k for k, _ in seen] == list(range(5)) and len(threads) == 1
    (thread,) = threads
    assert thread.daemon and thread is not threading.current_thread() and thread.name == "weight-send-test"
    with pytest.raises(ConnectionError, match="engine gone"):
        worker.submit(fail).result(timeout=10)
    assert worker.submit(lambda: "still serving").result(timeout=10) == "still serving"
    worker.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
