"""Health-monitor benchmarks; one JSON line per figure.

    python bench/bench_monitor.py [--quick]

- ``progress_call``: ns per ProgressTracker call (begin+end pair, ``with phase()``,
  step_done) next to a no-op Python call, on this machine;
- ``detection_latency``: seconds from fault to report for each injected fault (drill ranks,
  files backend, 2 s time-outs), against PyTorch's 10-minute NCCL default time-out, the
  earliest a plain job would learn of a hang;
- ``sidecar_cpu``: the sidecar's CPU use (psutil cpu_times over a window) watching 8 ranks
  that update their records ~100 times a second, at the production check interval (5 s) and
  at 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitoring.progress import ProgressTracker  # noqa: E402

NCCL_DEFAULT_TIMEOUT_S = 600.0
FAST = dict(check_interval_s=0.25, default_timeout_s=2.0, stall_timeout_s=30.0,
            startup_timeout_s=120.0, phase_timeouts_s={"setup": 120.0, "checkpoint": 2.0},
            min_learned_timeout_s=2.0, safety_factor=5.0, min_observations=1, stack_wait_s=2.0,
            kill_ranks_on_fault=True)


def emit(**fields) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TULU_FAULT", None)
    env.update(extra)
    return env


def bench_progress(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        t = ProgressTracker(d, 0, 1, install_hooks=False, flight_recorder=False)

        def noop(*a):
            pass

        def timeit(fn) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter_ns()
                fn()
                best = min(best, (time.perf_counter_ns() - t0) / n)
            return best

        def loop_noop():
            for i in range(n):
                noop("train", i)

        def loop_pair():
            for i in range(n):
                t.begin("train", i)
                t.end()

        def loop_with():
            for i in range(n):
                with t.phase("train", i):
                    pass

        def loop_done():
            for i in range(n):
                t.step_done(i)

        base = timeit(loop_noop)
        for name, fn, calls in (("begin+end", loop_pair, 2), ("with phase()", loop_with, 2),
                                ("step_done", loop_done, 1)):
            ns = timeit(fn)
            emit(figure="progress_call", api=name, ns_per_call=round(ns / calls, 1),
                 ns_per_use=round(ns, 1), noop_call_ns=round(base, 1), iterations=n)
        t.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_detection(faults: list[tuple[str, str, int]]) -> None:
    for name, spec, world in faults:
        with tempfile.TemporaryDirectory() as d:
            mon = Path(d)
            side = subprocess.Popen(
                [sys.executable, "-m", "monitoring.sidecar", "--monitor-dir", d,
                 "--world-size", str(world), "--config-json", json.dumps(FAST),
                 "--max-seconds", "120"], cwd=ROOT, env=_env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            port = str(_free_port())
            ranks = [subprocess.Popen(
                [sys.executable, "-m", "monitoring.drill", "--monitor-dir", d, "--steps", "4",
                 "--backend", "files"], cwd=ROOT,
                env=_env(RANK=str(r), WORLD_SIZE=str(world), MASTER_PORT=port, TULU_FAULT=spec),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(world)]
            side.wait(timeout=150)
            for p in ranks:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                p.wait()
            try:
                rep = json.loads((mon / "last_report.json").read_text())
            except OSError:
                emit(figure="detection_latency", fault=name, error="not detected")
                continue
            if rep["kind"] == "crash":
                culprit = rep["culprits"][0]["rank"] if rep["culprits"] else 0
                r = next(x for x in rep["ranks"] if x["rank"] == culprit)
                latency = rep["detected_at"] - r["updated"]
            else:
                latency = rep["fault"]["elapsed_s"]
            emit(figure="detection_latency", fault=name, kind=rep["kind"],
                 latency_s=round(latency, 2), timeout_s=rep["fault"]["timeout_s"],
                 culprit_ok=[c["rank"] for c in rep["culprits"]] == [1],
                 baseline_nccl_timeout_s=NCCL_DEFAULT_TIMEOUT_S,
                 speedup_vs_nccl=round(NCCL_DEFAULT_TIMEOUT_S / max(latency, 1e-3), 1))


RANK_LOOP = """
import sys, time
from monitoring.progress import ProgressTracker
t = ProgressTracker(sys.argv[1], int(sys.argv[2]), 8, install_hooks=False)
step = 0
while True:
    with t.phase("train", step):
        time.sleep(0.01)
    t.step_done(step)
    step += 1
"""


def bench_sidecar_cpu(window_s: float, intervals: list[float]) -> None:
    import psutil

    for interval in intervals:
        with tempfile.TemporaryDirectory() as d:
            ranks = [subprocess.Popen([sys.executable, "-c", RANK_LOOP, d, str(r)], cwd=ROOT,
                                      env=_env()) for r in range(8)]
            cfg = dict(check_interval_s=interval)
            side = subprocess.Popen(
                [sys.executable, "-m", "monitoring.sidecar", "--monitor-dir", d,
                 "--world-size", "8", "--config-json", json.dumps(cfg)], cwd=ROOT, env=_env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(3.0)  # start-up (imports) is not steady-state overhead
            p = psutil.Process(side.pid)
            c0, t0 = p.cpu_times(), time.monotonic()
            time.sleep(window_s)
            c1, t1 = p.cpu_times(), time.monotonic()
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            alive = side.poll() is None
            for q in ranks + [side]:
                q.kill()
                q.wait()
            emit(figure="sidecar_cpu", ranks=8, check_interval_s=interval,
                 window_s=round(t1 - t0, 1), cpu_s=round(cpu, 3),
                 cpu_percent_of_one_core=round(100 * cpu / (t1 - t0), 3),
                 ms_per_check=round(1000 * cpu / ((t1 - t0) / interval), 2),
                 sidecar_stayed_up=alive)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations and faults (CI)")
    args = ap.parse_args()
    bench_progress(20_000 if args.quick else 200_000)
    faults = [("sigstop", "kind=sigstop,rank=1,step=1,point=train", 2),
              ("exception", "kind=exception,rank=1,step=1,point=train", 2)]
    if not args.quick:
        faults += [("skip_collective", "kind=skip_collective,rank=1,step=1,point=train", 3),
                   ("sigkill", "kind=sigkill,rank=1,step=1,point=train", 2),
                   ("hang_checkpoint", "kind=hang_checkpoint,rank=1,step=2", 3),
                   ("gil_hang", "kind=gil_hang,rank=1,step=1,point=weight_sync", 3)]
    bench_detection(faults)
    bench_sidecar_cpu(10.0 if args.quick else 20.0, [5.0] if args.quick else [5.0, 1.0])


if __name__ == "__main__":
    main()
