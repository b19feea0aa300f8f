"""The body of one scorer worker process: receive a task, verify, send the answer back.

Started by the scorer as ``python -m tulu.rewards.worker FD MEMORY_LIMIT_MB [PLUGINS [WARM]]`` with
one end of a socket pair as FD; PLUGINS is a comma-separated list of modules to import first (they
register custom verifiers); WARM a comma-separated list of the built-in verifiers to warm up, or
``*`` (the default) for all of them. Protocol over it (parent -> worker): a list of ``(task_id,
verifier_name, completion, ground_truth)`` tasks or ``None`` to stop. Worker -> parent: ``("ready", pid)`` once warm, then
``(task_id, verified, error)`` per task, where ``error`` is None or ``"ExcType: message"``.
The worker never decides time-outs: the parent kills it when a task overruns.
"""

from __future__ import annotations

import signal
import sys

_ERROR_CHARS = 500


WARM_UP = {
    "gsm8k": ("so 12", "12"),
    "math": ("\\boxed{\\frac{1}{2}}", "0.5"),
    "ifeval": ("This is an English sentence.", '{"func_name": "validate_response_language", "language": "en"}'),
}


def warm_up(names: tuple[str, ...] | None = None) -> None:
    """Import the verifiers and run each once (math-verify's grammar, langdetect's profiles), so
    that a first task does not spend its time-out on imports. ``names``: only these (a worker of a
    GSM8K-only run skips sympy's seconds of start-up); None: all."""
    from tulu.rewards.verifier import get_verifier

    # verifier names are case-insensitive (a row's dataset says "MATH"), the table's keys lower-case
    for name in WARM_UP if names is None else {n.strip().lower() for n in names}:
        if name in WARM_UP:
            get_verifier(name).verify(*WARM_UP[name])


def _limit_memory(memory_limit_mb: int | None) -> None:
    if not memory_limit_mb:
        return
    import resource

    limit = int(memory_limit_mb) * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def worker_main(conn, memory_limit_mb: int | None, plugins: tuple[str, ...] = (),
                warm: tuple[str, ...] | None = None) -> None:
    """Serve tasks from ``conn`` until it closes or sends None."""
    import importlib
    import os

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_memory(memory_limit_mb)
    from tulu.rewards.verifier import get_verifier

    for module in plugins:
        importlib.import_module(module)
    warm_up(warm)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for task_id, name, completion, ground_truth in msg:
            try:
                verified, error = bool(get_verifier(name).verify(completion, ground_truth)), None
            except (Exception, RecursionError, MemoryError) as exc:  # noqa: BLE001 - scored 0, counted
                verified, error = False, f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
            conn.send((task_id, verified, error))


def main(argv: list[str] | None = None) -> None:
    from multiprocessing.connection import Connection

    fd, memory_limit_mb, *rest = list(argv if argv is not None else sys.argv[1:])
    plugins = rest[0] if rest else ""
    warm = rest[1] if len(rest) > 1 else "*"
    worker_main(Connection(int(fd)), int(memory_limit_mb) or None, tuple(filter(None, plugins.split(","))),
                None if warm == "*" else tuple(filter(None, warm.split(","))))


if __name__ == "__main__":
    main()
