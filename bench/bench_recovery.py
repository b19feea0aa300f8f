"""Fault recovery through the real local Slurm; one JSON line per figure.

    source /tmp/tulu-slurm/env.sh && python bench/bench_recovery.py [--quick] [--timeout-s 5]

One counter job (4 nodes x 2 tasks, gloo, 0.4 s steps) meets one injected fault per attempt
(``restart=k`` fires on attempt k), and the monitor requeues it each time. Per fault:

- ``detection_latency``: fault -> hang/crash report on disk (the report's ``detected_at``;
  includes the phase time-out, the check interval and the stack dumps);
- ``recovery_time``: fault -> the first step completed by the requeued attempt (Slurm requeue,
  scheduling, task start-up, torch import, process-group set-up, resume, one step).

Baseline: PyTorch's default NCCL process-group time-out (10 min), the earliest a job without
this monitor learns of a hung collective (a dead peer usually looks the same to NCCL). The
baseline recovery time is that time-out plus the same measured restart cost, and assumes
someone requeues automatically (submitit does not requeue crashes). Fault time is the
culprit's progress record: every fault fires right after it left its previous phase.

``--quick`` (CI): two faults (SIGKILL, a skipped collective) in a shorter job. Needs the local
Slurm (``bash slurm/local/start.sh``); exits 2 with a message if it is not up.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitoring.record import read_record, record_path  # noqa: E402

NCCL_DEFAULT_TIMEOUT_S = 600.0
WORLD = 8
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED"}

# (name, spec without restart, detected as); rank r runs on node n(r // 2 + 1).
FAULTS = [
    ("sigkill", "kind=sigkill,rank=5,point=train", "crash"),
    ("exception", "kind=exception,rank=6,point=train", "crash"),
    ("skip_collective", "kind=skip_collective,rank=0,point=train", "hang"),
    ("hang_checkpoint", "kind=hang_checkpoint,rank=2,point=checkpoint", "hang"),
    # Last: Slurm's SIGCONT (with the requeue's SIGTERM) lets a SIGSTOPped attempt run on
    # until KillWait's SIGKILL, so the resume step after it is not fixed.
    ("sigstop", "kind=sigstop,rank=3,point=train", "hang"),
]
QUICK = ("sigkill", "skip_collective")


def emit(**fields) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


def node_of(rank: int) -> str:
    return f"n{rank // 2 + 1}"


class StepWatcher(threading.Thread):
    """Per attempt, when a rank first completed a step after resuming (copied from
    tests/slurm/test_faults.py: benchmarks do not import tests)."""

    def __init__(self, monitor_dir: Path, world: int = WORLD, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.monitor_dir, self.world, self.interval_s = monitor_dir, world, interval_s
        self.first_step: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for rank in range(self.world):
                try:
                    rec = read_record(record_path(self.monitor_dir, rank))
                except OSError:
                    rec = None
                if rec is None or rec.n_steps < 2:
                    continue
                t = rec.done_time if rec.n_steps == 2 else None
                old = self.first_step.get(rec.attempt)
                if old is None and t is None:
                    self.first_step[rec.attempt] = rec.done_time
                elif t is not None and (old is None or t < old):
                    self.first_step[rec.attempt] = t
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def tulu(cwd: Path, env: dict, *args: str, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, "-m", "tulu.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"tulu {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def job_state(cwd: Path, env: dict, job: str) -> dict:
    out = tulu(cwd, env, "status", job)
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}


def attempt_started(monitor_dir: Path, job: str, attempt: int) -> float | None:
    """When the batch script of ``attempt`` started: its sidecar's first log line (1 s
    resolution; the sidecar starts before srun)."""
    try:
        first = (monitor_dir / f"monitor_{job}_{attempt}.log").read_text().splitlines()[0]
        stamp = re.match(r"\[monitor (\S+)Z\]", first).group(1)
    except (OSError, IndexError, AttributeError):
        return None
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and len(out.stdout.split()) >= 8


def run_sequence(names: list[str], timeout_s: float, check_s: float, wait_s: float) -> None:
    chosen = [f for f in FAULTS if f[0] in names]
    steps_between = 3
    plan = [(name, f"{spec},step={steps_between * (k + 1)},restart={k}", kind,
             steps_between * (k + 1), k) for k, (name, spec, kind) in enumerate(chosen)]
    steps = steps_between * len(plan) + 15     # room after a SIGSTOP (see FAULTS)
    with tempfile.TemporaryDirectory(prefix="bench_recovery_") as tmp:
        cwd = Path(tmp)
        env = dict(os.environ, TULU_HOME=str(cwd / "home"),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        name = "bench-recovery"
        mon = cwd / "runs" / name / "monitor"
        watcher = StepWatcher(mon)
        watcher.start()
        t0 = time.time()
        out = tulu(cwd, env, "submit", str(ROOT / "configs" / "tiny-cpu-rehearse.yaml"),
                   "--mode", "counter", "--set", f"run.name={name}",
                   "--set", f"run.counter_steps={steps}", "--set", "run.counter_step_s=0.4",
                   "--set", f"monitoring.max_restarts={len(plan) + 1}",
                   "--set", f"monitoring.check_interval_s={check_s}",
                   "--set", f"monitoring.phase_timeouts_s.train={timeout_s}",
                   "--set", f"monitoring.phase_timeouts_s.checkpoint={timeout_s}",
                   "--set", "monitoring.stall_timeout_s=30",
                   "--set", "monitoring.learn_timeouts=false",
                   "--set", "cluster.env.TULU_FAULT=" + ";".join(p[1] for p in plan))
        job = re.search(r"submitted job (\d+)", out).group(1)
        st: dict = {}
        try:
            while time.time() - t0 < wait_s:
                st = job_state(cwd, env, job)
                if st.get("state") in TERMINAL:
                    break
                time.sleep(2.0)
        finally:
            watcher.stop()
        if st.get("state") not in TERMINAL:
            subprocess.run(["scancel", job], capture_output=True)
        emit(figure="job", job_id=job, state=st.get("state"), restarts=st.get("restarts"),
             faults=[p[0] for p in plan], wall_s=round(time.time() - t0, 1),
             phase_timeout_s=timeout_s, check_interval_s=check_s)

        decisions = []
        path = mon / "decisions.jsonl"
        if path.exists():
            decisions = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        for fault, spec, kind, step, attempt in plan:
            rank = int(re.search(r"rank=(\d+)", spec).group(1))
            req = [d for d in decisions if d["attempt"] == attempt and d["action"] == "requeue"]
            if not req:
                emit(figure="detection_latency", fault=fault, error="no requeue decision for "
                     f"attempt {attempt}")
                continue
            rep = json.loads(Path(req[0]["report"]).read_text())
            culprits = [(c["rank"], c["node"]) for c in rep["culprits"]]
            rec = next((r for r in rep["ranks"] if r["rank"] == rank), None)
            if rec is None:
                emit(figure="detection_latency", fault=fault, error=f"rank {rank} not in report")
                continue
            t_fault = rec["phase_start"]
            detection = rep["detected_at"] - t_fault
            common = dict(fault=fault, detected_as=rep["kind"], expected=kind,
                          culprit_ok=culprits == [(rank, node_of(rank))], step=step,
                          baseline_nccl_timeout_s=NCCL_DEFAULT_TIMEOUT_S)
            emit(figure="detection_latency", latency_s=round(detection, 2),
                 rule_elapsed_s=rep["fault"]["elapsed_s"], timeout_s=rep["fault"]["timeout_s"],
                 speedup_vs_nccl=round(NCCL_DEFAULT_TIMEOUT_S / max(detection, 1e-3), 1),
                 **common)
            first = watcher.first_step.get(attempt + 1)
            if first is None:
                emit(figure="recovery_time", error="no step completed after the requeue", **common)
                continue
            recovery = first - t_fault
            baseline = NCCL_DEFAULT_TIMEOUT_S + (recovery - detection)
            started = attempt_started(mon, job, attempt + 1)
            split = {} if started is None else dict(
                report_to_restart_s=round(started - rep["detected_at"], 1),  # requeue + queue
                restart_to_first_step_s=round(first - started, 1))           # start-up + step
            emit(figure="recovery_time", recovery_s=round(recovery, 2),
                 restart_cost_s=round(recovery - detection, 2), **split,
                 baseline_recovery_s=round(baseline, 1),
                 speedup_vs_nccl=round(baseline / max(recovery, 1e-3), 1), **common)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (CI)")
    ap.add_argument("--timeout-s", type=float, default=5.0, help="train/checkpoint time-outs")
    ap.add_argument("--check-interval-s", type=float, default=0.5)
    ap.add_argument("--wait-s", type=float, default=900.0, help="give up on the job after this")
    args = ap.parse_args()
    if not cluster_up():
        print("bench_recovery: the local Slurm is not up (bash slurm/local/start.sh; "
              "source /tmp/tulu-slurm/env.sh)", file=sys.stderr)
        return 2
    names = list(QUICK) if args.quick else [f[0] for f in FAULTS]
    run_sequence(names, args.timeout_s, args.check_interval_s, args.wait_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
