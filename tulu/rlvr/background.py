"""A daemon thread that runs calls in turn: the learner's weight sends, an engine's scoring."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

__all__ = ["Background"]


class Background:
    """One daemon thread running the calls given to :meth:`submit` in turn (a daemon, unlike
    ``ThreadPoolExecutor``'s: a rank that fails mid-call must not wait for it at exit). Made once
    per run: starting a thread per step kept the step waiting for it to start."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - re-raised by future.result() on the caller's thread
                future.set_exception(e)

    def submit(self, fn) -> Future:
        future: Future = Future()
        self._calls.put((fn, future))
        return future

    def close(self) -> None:
        self._calls.put(None)
