"""Operating a submitted job: logs, status, cancel. Slurm calls stay here and in tulu.launch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tulu.config import config_from_dict
from tulu.launch.executor import find_job

TASK_LOG = re.compile(r"^(?P<job>[\w.]+)_(?P<task>\d+)_log\.(?P<stream>out|err)$")


def resolve(job: str) -> dict:
    """A job id from the index, or a run folder (newest job in its jobs.jsonl)."""
    p = Path(job)
    if p.is_dir() and (p / "jobs.jsonl").exists():
        last = (p / "jobs.jsonl").read_text().strip().splitlines()[-1]
        return find_job(json.loads(last)["job_id"])
    return find_job(job)


def task_logs(rec: dict, ranks: list[int] | None, streams=("out", "err")) -> list[tuple[int, str, Path]]:
    log_dir = Path(rec["log_dir"])
    found = []
    for f in sorted(log_dir.glob("*_log.*")) if log_dir.exists() else []:
        m = TASK_LOG.match(f.name)
        if m and m["stream"] in streams and (ranks is None or int(m["task"]) in ranks):
            found.append((int(m["task"]), m["stream"], f))
    return sorted(found, key=lambda x: (x[0], x[1]))


def group_ranks(rec: dict, group: str) -> list[int]:
    from tulu.plan import build_plan

    plan = build_plan(config_from_dict(rec["config"]))
    return [r for r in range(plan.world_size) if plan.role_of(r).role == group]


def logs(job: str, follow: bool = False, rank: int | None = None, group: str | None = None,
         lines: int = 40, out=sys.stdout, poll_s: float = 0.5, stop_after_s: float | None = None) -> int:
    rec = resolve(job)
    ranks = [rank] if rank is not None else (group_ranks(rec, group) if group else None)
    files = task_logs(rec, ranks)
    if not files and not follow:
        print(f"no logs yet in {rec['log_dir']}", file=out)
        return 1
    offsets: dict[Path, int] = {}
    for task, stream, f in files:
        text = f.read_text(errors="replace").splitlines()
        print(f"==> rank {task} ({stream}) {f} <==", file=out)
        for line in text[-lines:] if lines else text:
            print(f"[{task}] {line}", file=out)
        offsets[f] = f.stat().st_size
    started = time.time()
    while follow and (stop_after_s is None or time.time() - started < stop_after_s):
        time.sleep(poll_s)
        for task, stream, f in task_logs(rec, ranks):
            size = f.stat().st_size
            pos = offsets.get(f, 0)
            if size < pos:  # truncated: start over
                pos = 0
            if size > pos:
                with open(f, errors="replace") as fh:
                    fh.seek(pos)
                    for line in fh.read().splitlines():
                        print(f"[{task}] {line}", file=out, flush=True)
                offsets[f] = size
    return 0


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def slurm_state(job_id: str) -> dict:
    """State from sacct (accounting keeps finished jobs), restarts from `scontrol` or sacct's
    duplicates (one row per attempt)."""
    rows = [line.split("|") for line in _run(
        ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "JobID,State,NodeList,ExitCode,Elapsed,Start,End"]
    ).splitlines() if line.strip()]
    info: dict = {"job_id": job_id}
    if rows:
        last = rows[-1]
        info.update(state=last[1].split()[0], nodes=last[2], exit_code=last[3], elapsed=last[4],
                    attempts=len(rows))
    sc = _run(["scontrol", "show", "job", job_id])
    m = re.search(r"Restarts=(\d+)", sc)
    if m:
        info["restarts"] = int(m.group(1))
        st = re.search(r"JobState=(\w+)", sc)
        if st and "state" not in info:
            info["state"] = st.group(1)
    elif rows:
        info["restarts"] = len(rows) - 1
    return info


def last_step(rec: dict) -> int | None:
    run_dir = Path(rec["run_dir"])
    counter = run_dir / "counter" / "state.json"
    if counter.exists():
        return json.loads(counter.read_text()).get("step")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().strip().splitlines()
        if lines:
            return json.loads(lines[-1]).get("step")
    return None


def status(job: str, out=sys.stdout) -> dict:
    rec = resolve(job)
    info = slurm_state(rec["job_id"]) if rec.get("executor", "slurm") == "slurm" else {"job_id": rec["job_id"]}
    info["run_dir"] = rec["run_dir"]
    info["last_step"] = last_step(rec)
    report = None
    try:
        from monitoring.diagnosis import load_last_report

        report = load_last_report(rec["monitor_dir"])
    except (ImportError, OSError, ValueError):
        report = None
    for k in ("job_id", "state", "restarts", "nodes", "exit_code", "elapsed", "last_step", "run_dir"):
        if k in info:
            print(f"{k:>10}: {info[k]}", file=out)
    try:
        from monitoring.recovery import stop_reason

        stopped = stop_reason(rec["monitor_dir"], rec["job_id"])
    except (ImportError, OSError, ValueError):
        stopped = None
    if stopped:
        info["requeue_stopped"] = stopped
        print(f"{'requeues':>10}: stopped: {stopped}", file=out)
    if report:
        info["last_report"] = report
        summary = report.get("summary") or report.get("kind")
        print(f"{'monitor':>10}: last report: {summary}", file=out)
    return info


def cancel(job: str, out=sys.stdout) -> int:
    rec = resolve(job)
    r = subprocess.run(["scancel", rec["job_id"]], capture_output=True, text=True, timeout=60)
    print(r.stdout + r.stderr or f"cancelled {rec['job_id']}", file=out)
    return r.returncode


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def wait_for_state(job_id: str, timeout_s: float = 3600.0, poll_s: float = 1.0) -> dict:
    """Poll until the job reaches a terminal state (a requeued job is not finished)."""
    deadline = time.time() + timeout_s
    info: dict = {}
    while time.time() < deadline:
        info = slurm_state(job_id)
        if info.get("state") in TERMINAL:
            return info
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} still {info.get('state')} after {timeout_s:.0f} s")


def wait(job_id: str, job=None, out=sys.stdout) -> int:
    rec = resolve(job_id)
    if rec.get("executor") == "local":
        try:
            job.results()
            print(f"job {job_id}: COMPLETED", file=out)
            return 0
        except Exception as e:  # the task's own traceback is in its log
            print(f"job {job_id}: FAILED: {e}", file=out)
            return 1
    offsets: dict[Path, int] = {}
    while True:
        info = slurm_state(job_id)
        for task, stream, f in task_logs(rec, None, streams=("out",)):
            size = f.stat().st_size
            if size > offsets.get(f, 0):
                with open(f, errors="replace") as fh:
                    fh.seek(offsets.get(f, 0))
                    for line in fh.read().splitlines():
                        print(f"[{task}] {line}", file=out, flush=True)
                offsets[f] = size
        if info.get("state") in TERMINAL:
            print(f"job {job_id}: {info['state']} (restarts: {info.get('restarts', 0)})", file=out)
            return 0 if info["state"] == "COMPLETED" else 1
        time.sleep(1.0)
