"""Fault recovery through the real local Slurm, in-job restart beside requeue; one JSON line
per figure.

    source /tmp/tulu-slurm/env.sh && python bench/bench_recovery.py [--all] [--timeout-s 5]

Counter jobs (2 nodes x 2 tasks, gloo, 0.4 s steps) meet one injected fault per attempt
(``restart=k`` fires on attempt k), always on rank 3 (the training step's second node, not the
batch host). Every fault is run on both recovery paths, in the same run:

- ``path: "requeue"``: one job without spare nodes; the monitor requeues it after each fault
  (Slurm requeue cycle, scheduling, a new batch script);
- ``path: "in-job"``: jobs with ``cluster.spare_nodes`` (one spare per fault, at most 2 per job
  on the 4-node local cluster): the monitor kills the step and starts the next one on a spare
  inside the allocation.

Per fault and path:
- ``detection_latency``: fault -> hang/crash report on disk (the report's ``detected_at``;
  includes the phase time-out, the check interval and the stack dumps);
- ``recovery_time``: fault -> the first step completed by the next attempt (for a requeue:
  Slurm's requeue, scheduling, task start-up; for an in-job restart: killing the step and a
  new srun step; both then torch import, process-group set-up, resume, one step).

Baseline: PyTorch's default NCCL process-group time-out (10 min), the earliest a job without
this monitor learns of a hung collective (a dead peer usually looks the same to NCCL). The
baseline recovery time is that time-out plus the same measured restart cost, and assumes
someone requeues automatically (submitit does not requeue crashes). Fault time is the
culprit's progress record: every fault fires right after it left its previous phase.

Default faults: SIGKILL (a crash) and SIGSTOP (a hang); ``--all`` runs every kind below
(``--quick`` is the default set, kept for CI). Needs the local Slurm with 4 nodes
(``bash slurm/local/start.sh``); exits 2 with a message if it is not up.
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
WORLD = 4               # 2 nodes x 2 tasks
RANK = 3                # the faulty rank: on the step's second node (never the batch host)
SPARES_PER_JOB = 2      # 2 active + 2 spares = the local cluster's 4 nodes
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED"}

# (name, spec without rank/step/restart, detected as)
FAULTS = [
    ("sigkill", "kind=sigkill,point=train", "crash"),
    ("sigstop", "kind=sigstop,point=train", "hang"),
    ("exception", "kind=exception,point=train", "crash"),
    ("skip_collective", "kind=skip_collective,point=train", "hang"),
    ("hang_checkpoint", "kind=hang_checkpoint,point=checkpoint", "hang"),
]
DEFAULT = ("sigkill", "sigstop")


def emit(**fields) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


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


def run_job(path: str, chosen: list[tuple[str, str, str]], timeout_s: float, check_s: float,
            wait_s: float, tag: str) -> None:
    """One counter job meeting ``chosen`` faults on successive attempts, recovered by ``path``
    ("requeue": no spare nodes; "in-job": one spare per fault); emits its figures."""
    steps_between = 3
    plan = [(name, f"{spec},rank={RANK},step={steps_between * (k + 1)},restart={k}", kind,
             steps_between * (k + 1), k) for k, (name, spec, kind) in enumerate(chosen)]
    steps = steps_between * len(plan) + 6
    spares = len(plan) if path == "in-job" else 0
    with tempfile.TemporaryDirectory(prefix="bench_recovery_") as tmp:
        cwd = Path(tmp)
        env = dict(os.environ, TULU_HOME=str(cwd / "home"),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        name = f"bench-recovery-{tag}"
        mon = cwd / "runs" / name / "monitor"
        watcher = StepWatcher(mon)
        watcher.start()
        t0 = time.time()
        out = tulu(cwd, env, "submit", str(ROOT / "configs" / "tiny-cpu-rehearse.yaml"),
                   "--mode", "counter", "--set", f"run.name={name}",
                   "--set", "cluster.nodes=2", "--set", "groups.training.dp=1",
                   "--set", f"cluster.spare_nodes={spares}",
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
        emit(figure="job", path=path, job_id=job, state=st.get("state"),
             slurm_restarts=st.get("restarts"), spare_nodes=spares, faults=[p[0] for p in plan],
             wall_s=round(time.time() - t0, 1), phase_timeout_s=timeout_s, check_interval_s=check_s)

        decisions = []
        dpath = mon / "decisions.jsonl"
        if dpath.exists():
            decisions = [json.loads(ln) for ln in dpath.read_text().splitlines() if ln.strip()]
        want = "restart" if path == "in-job" else "requeue"
        for fault, spec, kind, step, attempt in plan:
            acted = [d for d in decisions if d["attempt"] == attempt
                     and d["action"] in ("restart", "requeue", "stop")]
            if not acted or acted[0]["action"] != want:
                emit(figure="detection_latency", path=path, fault=fault,
                     error=f"attempt {attempt}: expected a {want}, decisions {acted}")
                continue
            rep = json.loads(Path(acted[0]["report"]).read_text())
            culprits = [c["rank"] for c in rep["culprits"]]
            rec = next((r for r in rep["ranks"] if r["rank"] == RANK), None)
            if rec is None:
                emit(figure="detection_latency", path=path, fault=fault,
                     error=f"rank {RANK} not in report")
                continue
            t_fault = rec["phase_start"]
            detection = rep["detected_at"] - t_fault
            common = dict(path=path, fault=fault, detected_as=rep["kind"], expected=kind,
                          culprit_ok=culprits == [RANK], culprit_nodes=rep["culprit_nodes"],
                          decided_by=acted[0]["by"], step=step,
                          baseline_nccl_timeout_s=NCCL_DEFAULT_TIMEOUT_S)
            emit(figure="detection_latency", latency_s=round(detection, 2),
                 rule_elapsed_s=rep["fault"]["elapsed_s"], timeout_s=rep["fault"]["timeout_s"],
                 speedup_vs_nccl=round(NCCL_DEFAULT_TIMEOUT_S / max(detection, 1e-3), 1),
                 **common)
            first = watcher.first_step.get(attempt + 1)
            if first is None:
                emit(figure="recovery_time", error=f"no step completed after the {want}", **common)
                continue
            recovery = first - t_fault
            baseline = NCCL_DEFAULT_TIMEOUT_S + (recovery - detection)
            started = attempt_started(mon, job, attempt + 1)
            split = {} if started is None else dict(
                report_to_restart_s=round(started - rep["detected_at"], 1),  # kill/requeue + start
                restart_to_first_step_s=round(first - started, 1))           # start-up + step
            emit(figure="recovery_time", recovery_s=round(recovery, 2),
                 restart_cost_s=round(recovery - detection, 2), **split,
                 baseline_recovery_s=round(baseline, 1),
                 speedup_vs_nccl=round(baseline / max(recovery, 1e-3), 1), **common)


def run_both(names: list[str], timeout_s: float, check_s: float, wait_s: float) -> None:
    chosen = [f for f in FAULTS if f[0] in names]
    run_job("requeue", chosen, timeout_s, check_s, wait_s, "requeue")
    for i in range(0, len(chosen), SPARES_PER_JOB):
        run_job("in-job", chosen[i:i + SPARES_PER_JOB], timeout_s, check_s, wait_s,
                f"injob{i // SPARES_PER_JOB}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(DEFAULT)} (the default; CI)")
    ap.add_argument("--all", action="store_true", help="every fault kind: " + ", ".join(f[0] for f in FAULTS))
    ap.add_argument("--timeout-s", type=float, default=5.0, help="train/checkpoint time-outs")
    ap.add_argument("--check-interval-s", type=float, default=0.5)
    ap.add_argument("--wait-s", type=float, default=900.0, help="give up on the job after this")
    args = ap.parse_args()
    if not cluster_up():
        print("bench_recovery: the local Slurm is not up (bash slurm/local/start.sh; "
              "source /tmp/tulu-slurm/env.sh)", file=sys.stderr)
        return 2
    names = [f[0] for f in FAULTS] if args.all and not args.quick else list(DEFAULT)
    run_both(names, args.timeout_s, args.check_interval_s, args.wait_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
