"""`RewardScorer`: scores rows in a pool of worker processes, each call under a hard time-out.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one stuck worker (only the whole
pool, and a killed worker breaks it). Here each worker has its own pipe; the parent keeps up to
:data:`IN_FLIGHT` tasks queued at each worker (at most :data:`IN_FLIGHT_BYTES` of them, so a send
never blocks on a full pipe), which answers them in order, so a worker never sits idle waiting
for the parent between rows (32 GSM8K rows on 2 workers, idle machine: 1.5 ms with one row per
worker at a time, 0.56 ms like this). The task at the head of a worker's queue has the deadline, set when the worker could start
it (the send, or the answer before it); the parent waits on all pipes with the earliest deadline,
and when a task overruns it SIGKILLs that worker, starts a replacement and gives the tasks queued
behind the stuck one to the other workers. So the pool never hangs, a time-out costs one
worker restart (a new interpreter, ready in a second or two), and nothing a verifier does — an
exception, a ``RecursionError``, running out of its memory limit, a crash — reaches the caller:
such a row scores as unverified and is counted in :attr:`RewardScorer.stats`.

Rows follow Ai2's RLVR schema: ``dataset`` names the verifier (case-insensitive), ``ground_truth``
is its string (for IFEval a JSON object, or an already-parsed dict), ``completion`` is the model's
text, and the optional ``ended_with_eos`` (default True) feeds ``RewardConfig.no_eos_penalty``.
A row missing one of these, or naming an unknown verifier, is scored unverified with an error.

Each worker is a fresh interpreter (``python -m tulu.rewards.worker``) talking over a socket pair:
safe beside CUDA and threads in the training process, and — unlike multiprocessing's spawn and
forkserver — it never re-imports the caller's ``__main__`` (a training script). Workers import and
warm the verifiers before they take work; a replacement takes about a second or two to be ready,
while the other workers carry on. The training process never imports math-verify or langdetect.
"""

from __future__ import annotations

import importlib
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from tulu.rewards.config import RewardConfig
from tulu.rewards.verifier import UnknownVerifierError, get_verifier

REQUIRED_COLUMNS = ("completion", "dataset", "ground_truth")
INVALID_ROW = "<invalid>"
"""The verifier name reported for a row that is not a mapping (e.g. a line that is not JSON)."""


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """The outcome of one row. ``verifier`` is the registry name (lower case) or the row's raw
    ``dataset`` value when it names no verifier; ``error`` says why a row could not be verified
    (bad row, verifier error, ``timeout``, worker crash) and is None otherwise."""

    reward: float
    verified: bool
    verifier: str
    error: str | None = None


@dataclass(slots=True)
class VerifierStats:
    rows: int = 0
    verified: int = 0
    errors: int = 0
    bad_rows: int = 0
    timeouts: int = 0

    @property
    def accuracy(self) -> float:
        return self.verified / self.rows if self.rows else 0.0


@dataclass(slots=True)
class ScoreStats:
    """Counters since the scorer started. ``errors``: a verifier raised (e.g. malformed ground
    truth) or its worker died; ``bad_rows``: rows rejected before verification (missing column,
    unknown verifier); ``timeouts``: rows that ran out of time; ``workers_replaced``: workers
    killed or found dead and restarted. Every such row is scored unverified."""

    rows: int = 0
    verified: int = 0
    errors: int = 0
    bad_rows: int = 0
    timeouts: int = 0
    workers_replaced: int = 0
    per_verifier: dict[str, VerifierStats] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        for name, vs in self.per_verifier.items():
            out["per_verifier"][name]["accuracy"] = round(vs.accuracy, 6)
        return out


IN_FLIGHT = 8
"""Tasks sent to one worker ahead of its answers."""
IN_FLIGHT_BYTES = 32 << 10
"""...and their text, at most (a lone task may be longer): well under a socket pair's buffer."""

MAX_STARTUP_FAILURES = 3
"""Workers dying this many times in a row before they are ready means a broken environment."""


class RewardScorerError(RuntimeError):
    """The worker pool cannot run at all (workers die while starting)."""


class _Worker:
    __slots__ = ("proc", "conn", "ready", "tasks", "bytes", "deadline", "started")

    def __init__(self, memory_limit_mb: int | None, plugins: tuple[str, ...], warm: tuple[str, ...] | None):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # as multiprocessing's spawn
        fd = child_sock.fileno()
        cmd = [sys.executable, "-m", "tulu.rewards.worker", str(fd), str(memory_limit_mb or 0)]
        cmd += [",".join(plugins), "*" if warm is None else ",".join(warm)]
        self.proc = subprocess.Popen(cmd, pass_fds=[fd], env=env, stdin=subprocess.DEVNULL)
        child_sock.close()
        self.conn = multiprocessing.connection.Connection(parent_sock.detach())
        self.ready = False
        self.tasks: deque[tuple[int, int]] = deque()  # (row, bytes) sent and not answered, in order
        self.bytes = 0
        self.deadline = 0.0  # the first task's
        self.started = time.monotonic()

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        try:
            w.proc.wait(1)
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()


class RewardScorer:
    """A pool of ``workers`` processes scoring rows with a ``timeout_s`` limit per row.

    ``memory_limit_mb`` caps each worker's address space (``RLIMIT_AS``; None for no cap): a
    verifier that runs out scores 0 with an error instead of swapping the node.
    ``startup_timeout_s`` bounds a worker's start; if a worker does not start in time, or
    :data:`MAX_STARTUP_FAILURES` in a row die while starting, the scorer closes and raises
    :class:`RewardScorerError` (the environment is broken: fix it, don't train on zeros).
    ``plugins``: modules imported by the workers (and here) before work starts; they register
    custom verifiers with :func:`tulu.rewards.register_verifier`. ``verifiers``: the built-in
    verifiers the workers warm up before they report ready (None: all; a run that only scores
    GSM8K need not wait for the MATH verifier's imports).
    """

    def __init__(
        self,
        cfg: RewardConfig | None = None,
        *,
        workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 120.0,
        plugins: Sequence[str] = (),
        verifiers: Sequence[str] | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.cfg = cfg or RewardConfig()
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = float(startup_timeout_s)
        self.stats = ScoreStats()
        self.plugins = tuple(plugins)
        self.verifiers = None if verifiers is None else tuple(verifiers)
        for module in self.plugins:  # so that rows naming plugin verifiers pass the row check
            importlib.import_module(module)
        self._startup_failures = 0
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(workers):
            self._workers.append(_Worker(memory_limit_mb, self.plugins, self.verifiers))
        self._wait_until_ready()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        self._finalizer()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while not all(w.ready for w in self._workers):
            self._poll(max(0.0, deadline - time.monotonic()), lambda *a: None, None)
            if time.monotonic() > deadline:
                raise RewardScorerError(
                    f"reward workers did not start within {self.startup_timeout_s:.0f} s"
                )

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.stats.workers_replaced += 1
        self._workers[self._workers.index(w)] = _Worker(self.memory_limit_mb, self.plugins, self.verifiers)

    # -- scoring -----------------------------------------------------------------------------

    def _result(
        self, key: str, verified: bool, eos: bool, error: str | None, *, bad: bool = False
    ) -> ScoreResult:
        s = self.stats
        vs = s.per_verifier.setdefault(key, VerifierStats())
        s.rows += 1
        vs.rows += 1
        if verified:
            s.verified += 1
            vs.verified += 1
        if bad:
            s.bad_rows += 1
            vs.bad_rows += 1
        elif error == "timeout":
            s.timeouts += 1
            vs.timeouts += 1
        elif error is not None:
            s.errors += 1
            vs.errors += 1
        return ScoreResult(self.cfg.reward(verified, eos), verified, key, error)

    def _check_row(self, row: object) -> tuple[str, str | None]:
        """``(verifier key, problem)``: the problem is None for a good row."""
        if not isinstance(row, Mapping):
            return INVALID_ROW, f"row must be a mapping, got {type(row).__name__}"
        missing = [c for c in REQUIRED_COLUMNS if row.get(c) is None]
        if missing:
            return str(row.get("dataset") or INVALID_ROW), f"missing column(s) {missing}"
        try:
            key = get_verifier(row["dataset"]).name.lower()
        except UnknownVerifierError as exc:
            return str(row["dataset"]), str(exc)
        if not isinstance(row["completion"], str):
            return key, f"'completion' must be a string, got {type(row['completion']).__name__}"
        if not isinstance(row["ground_truth"], (str, dict)):
            return key, f"'ground_truth' must be a string, got {type(row['ground_truth']).__name__}"
        return key, None

    def score(self, rows: Iterable[Mapping]) -> list[ScoreResult]:
        """Score ``rows`` (see the module docstring); one result per row, in order. Never raises
        because of a row's content; raises :class:`RewardScorerError` only if no worker can start."""
        if not self._workers:
            raise RuntimeError("RewardScorer is closed")
        rows = list(rows)
        results: list[ScoreResult | None] = [None] * len(rows)
        keys: list[str] = [""] * len(rows)
        eos = [True] * len(rows)
        queue: deque[int] = deque()
        for i, row in enumerate(rows):
            key, problem = self._check_row(row)
            keys[i] = key
            if problem is None:
                eos[i] = bool(row.get("ended_with_eos", True))
                queue.append(i)
            else:
                results[i] = self._result(key, False, True, f"bad row: {problem}", bad=True)

        def done(i: int, verified: bool, error: str | None) -> None:
            results[i] = self._result(keys[i], verified, eos[i], error)

        def size(i: int) -> int:
            row = rows[i]
            return len(row["completion"]) + len(str(row["ground_truth"]))

        def takes(w: _Worker) -> bool:
            return w.ready and len(w.tasks) < IN_FLIGHT and (not w.tasks or w.bytes + size(queue[0]) <= IN_FLIGHT_BYTES)

        while queue or any(w.tasks for w in self._workers):
            # one row per worker in turn, so a short batch spreads over all of them; each worker's
            # rows of a round go in one message (a message per row cost ~50 us each way)
            batches: dict[_Worker, list[int]] = {}
            while queue and (ready := [w for w in self._workers if takes(w)]):
                for w in ready:
                    if not queue:
                        break
                    i = queue.popleft()
                    batches.setdefault(w, []).append(i)
                    w.tasks.append((i, size(i)))
                    w.bytes += w.tasks[-1][1]
            for w, batch in batches.items():
                started = len(w.tasks) == len(batch)  # its queue was empty: the first row starts now
                try:
                    w.conn.send([(i, keys[i], rows[i]["completion"], rows[i]["ground_truth"]) for i in batch])
                except (OSError, ValueError):  # it died: these rows go elsewhere, as do its queue's
                    for _ in batch:
                        w.bytes -= w.tasks.pop()[1]
                    queue.extendleft(reversed(batch))
                    self._lost(w, "worker died (exit code {})", done, queue)
                    continue
                if started:
                    w.deadline = time.monotonic() + self.timeout_s
            self._poll(self._next_wait(), done, queue)
        return results  # type: ignore[return-value]

    def _lost(self, w: _Worker, why: str, done, queue: deque | None) -> None:
        """``w`` is dead or killed: its first task gets ``why`` (exit code filled in), the tasks
        queued behind it go back to the front of ``queue``, and a new worker takes its place."""
        if w.tasks:
            head, _ = w.tasks.popleft()
            if queue is not None:
                queue.extendleft(i for i, _ in reversed(w.tasks))
            w.tasks.clear()
            w.kill()  # reaps it, so the exit code is known
            done(head, False, why.format(w.exitcode))
        self._replace(w)

    def _next_wait(self) -> float:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.tasks]
        deadlines += [w.started + self.startup_timeout_s for w in self._workers if not w.ready]
        return max(0.0, min(deadlines) - now) if deadlines else 0.05

    def _read(self, w: _Worker, done, queue: deque | None) -> None:
        """Every message ``w`` has sent so far (its results answer its rows in order)."""
        while True:
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):  # the worker died (crash, OOM killer, external kill)
                w.kill()  # reaps it, so the exit code is known
                if not w.ready:
                    self._startup_failures += 1
                    if self._startup_failures >= MAX_STARTUP_FAILURES:
                        self.close()
                        raise RewardScorerError(
                            f"{MAX_STARTUP_FAILURES} reward workers in a row died while starting "
                            f"(last exit code {w.exitcode}); run `python -c 'import "
                            "tulu.rewards.worker as w; w.warm_up()'` to see why"
                        )
                self._lost(w, "worker died (exit code {})", done, queue)
                return
            if msg[0] == "ready":
                w.ready = True
                self._startup_failures = 0
            else:
                task_id, verified, error = msg
                if w.tasks and task_id == w.tasks[0][0]:
                    w.bytes -= w.tasks.popleft()[1]
                    done(task_id, verified, error)
                    w.deadline = time.monotonic() + self.timeout_s  # the next task starts now
            try:
                if not w.conn.poll():
                    return
            except (EOFError, OSError):
                return  # closed: the next wait reports it

    def _poll(self, wait_s: float, done, queue: deque | None = None) -> None:
        by_conn = {w.conn: w for w in self._workers}
        for conn in multiprocessing.connection.wait(list(by_conn), timeout=wait_s):
            self._read(by_conn[conn], done, queue)
        now = time.monotonic()
        for w in list(self._workers):
            if w.tasks and now >= w.deadline:
                self._lost(w, "timeout", done, queue)
            elif not w.ready and now >= w.started + self.startup_timeout_s:
                self.close()
                raise RewardScorerError(
                    f"a reward worker did not start within {self.startup_timeout_s:.0f} s"
                )
