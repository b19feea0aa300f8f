"""Operating a submitted job: logs, status, cancel. Slurm calls stay here and in tulu.launch.

A job is named by its id (the index under `$TULU_HOME/jobs`, written at submit time) or by its run
folder (the newest job in its `jobs.jsonl`, or in `logs/` for a pipeline's pairs and evaluation
steps). A name that fits neither, a rank or group the job does not have, or a Slurm that does not
answer is a `CommandError` that says what does exist.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tulu.config.job import ConfigError, config_from_dict
from tulu.errors import CommandError
from tulu.launch.executor import find_job, tulu_home

TASK_LOG = re.compile(r"^(?P<job>[\w.]+)_(?P<task>\d+)_log\.(?P<stream>out|err)$")


def rank_list(ranks: list[int]) -> str:
    """`[0, 1, 2, 5]` -> `0-2, 5`."""
    spans: list[list[int]] = []
    for r in sorted(set(ranks)):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _job_folders(run_dir: Path) -> list[Path]:
    """`logs/<job_id>` folders of a run, oldest first."""
    logs = run_dir / "logs"
    found = [d for d in logs.iterdir() if d.is_dir()] if logs.is_dir() else []
    return sorted(found, key=lambda d: d.stat().st_mtime)


def _is_run_folder(p: Path) -> bool:
    return (p / "jobs.jsonl").exists() or bool(_job_folders(p))


def _folder_record(run_dir: Path, job_id: str) -> dict:
    """What the index would say about `job_id`, from its run folder alone."""
    run_dir = run_dir.resolve()
    cfg = None
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        pass
    executor = (cfg or {}).get("cluster", {}).get("executor")
    if executor is None:  # a pipeline's pairs or evaluation step: the pipeline's executor
        try:
            executor = json.loads((run_dir.parent / "pipeline.json").read_text()).get("executor")
        except (OSError, ValueError, AttributeError):
            executor = None
    return {"job_id": str(job_id), "run_dir": str(run_dir), "log_dir": str(run_dir / "logs" / str(job_id)),
            "monitor_dir": str(run_dir / "monitor"), "executor": executor or "slurm", "config": cfg}


def _resolve_folder(p: Path) -> dict:
    jobs = p / "jobs.jsonl"
    if jobs.exists():
        lines = [x for x in jobs.read_text().splitlines() if x.strip()]
        try:
            job_id = str(json.loads(lines[-1])["job_id"])
        except (IndexError, ValueError, KeyError, TypeError):
            raise CommandError("cannot read the run's job list", jobs) from None
        try:
            rec = find_job(job_id)
        except FileNotFoundError:
            rec = None
        if rec and Path(rec["run_dir"]).resolve() == p.resolve():
            return rec
        return _folder_record(p, job_id)
    folders = _job_folders(p)
    if folders:
        return _folder_record(p, folders[-1].name)
    subs = sorted(d for d in p.iterdir() if d.is_dir() and _is_run_folder(d))
    if (p / "pipeline.json").exists():
        raise CommandError("a pipeline folder, not a run folder", p,
                           "pass one of its stages: " + ", ".join(str(d) for d in subs) if subs
                           else "none of its stages has a job yet")
    raise CommandError("not a run folder (no jobs.jsonl, no logs/)", p,
                       "run folders in it: " + ", ".join(str(d) for d in subs) if subs
                       else "pass a job id (tulu submit prints it) or a run folder such as runs/<name>")


def resolve(job: str) -> dict:
    """A job id from the index, or a run folder (its newest job)."""
    p = Path(job).expanduser()
    if p.is_dir():
        return _resolve_folder(p)
    if p.exists():
        raise CommandError("not a job id nor a run folder", job, "pass a job id or a run folder such as runs/<name>")
    try:
        return find_job(job)
    except FileNotFoundError:
        if "/" in job or job.startswith((".", "~")):
            raise CommandError("no such run folder", job) from None
        raise CommandError("no such job", job, f"it was not submitted through tulu here (no {tulu_home() / 'jobs'}"
                                               f"/{job}.json); pass its run folder instead") from None


def task_logs(rec: dict, ranks: list[int] | None, streams=("out", "err")) -> list[tuple[int, str, Path]]:
    log_dir = Path(rec["log_dir"])
    found = []
    for f in sorted(log_dir.glob("*_log.*")) if log_dir.exists() else []:
        m = TASK_LOG.match(f.name)
        if m and m["stream"] in streams and (ranks is None or int(m["task"]) in ranks):
            found.append((int(m["task"]), m["stream"], f))
    return sorted(found, key=lambda x: (x[0], x[1]))


def _plan(rec: dict):
    """The job's rank plan from its recorded config, or None (no config, or it no longer parses)."""
    if not rec.get("config"):
        return None
    from tulu.plan.layout import build_plan

    try:
        return build_plan(config_from_dict(rec["config"]))
    except (ConfigError, ValueError):
        return None


def group_ranks(rec: dict, group: str) -> list[int]:
    plan = _plan(rec)
    if plan is None:
        raise CommandError(f"cannot tell the ranks of the {group} group", rec["run_dir"],
                           "the run has no readable config.json; use --rank")
    ranks = [r for r in range(plan.world_size) if plan.role_of(r).role == group]
    if not ranks:
        groups = {}
        for r in range(plan.world_size):
            groups.setdefault(plan.role_of(r).role, []).append(r)
        raise CommandError(f"no {group} group", f"job {rec['job_id']}", "its groups: " + ", ".join(
            f"{g} (ranks {rank_list(rs)})" for g, rs in groups.items()))
    return ranks


def _check_rank(rec: dict, rank: int) -> None:
    plan = _plan(rec)
    if plan is not None and rank >= plan.world_size:
        raise CommandError(f"no rank {rank}", f"job {rec['job_id']}",
                           f"its ranks: {rank_list(list(range(plan.world_size)))}")


def _no_logs(rec: dict, ranks: list[int] | None, rank: int | None, group: str | None) -> CommandError:
    log_dir = Path(rec["log_dir"])
    present = sorted({task for task, _, _ in task_logs(rec, None)})
    if ranks is not None and present:
        which = f"rank {rank}" if rank is not None else f"the {group} group (ranks {rank_list(ranks)})"
        return CommandError(f"no logs of {which}", log_dir, f"ranks with logs: {rank_list(present)}")
    earlier = [d.name for d in _job_folders(Path(rec["run_dir"])) if d.name != str(rec["job_id"])]
    hint = (f"earlier jobs of this run with logs: {', '.join(earlier)}" if earlier
            else f"the job may not have started: tulu status {rec['job_id']}")
    return CommandError(f"no logs yet of job {rec['job_id']}", log_dir, hint)


def logs(job: str, follow: bool = False, rank: int | None = None, group: str | None = None,
         lines: int = 40, out=sys.stdout, poll_s: float = 0.5, stop_after_s: float | None = None) -> int:
    rec = resolve(job)
    if rank is not None:
        _check_rank(rec, rank)
    ranks = [rank] if rank is not None else (group_ranks(rec, group) if group else None)
    storage = storage_line(rec)
    if storage:
        print(f"==> storage fault: {storage} <==", file=out)
    files = task_logs(rec, ranks)
    if not files and not follow:
        raise _no_logs(rec, ranks, rank, group)
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


def _run(cmd: list[str]) -> tuple[str, str | None]:
    """(stdout, None), or ("", why the command did not answer)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return "", f"{cmd[0]}: command not found"
    except OSError as e:
        return "", f"{cmd[0]}: {e.strerror}"
    except subprocess.TimeoutExpired:
        return "", f"{cmd[0]}: no answer in 60 s"
    if r.returncode:
        lines = (r.stderr or r.stdout).strip().splitlines()
        last = lines[-1].strip() if lines else f"exit status {r.returncode}"  # Slurm's fatal line comes last
        return r.stdout, last if last.startswith(f"{cmd[0]}:") else f"{cmd[0]}: {last}"
    return r.stdout, None


def slurm_state(job_id: str) -> dict:
    """State from sacct (accounting keeps finished jobs), restarts from `scontrol` or sacct's
    duplicates (one row per attempt). `slurm_error` says why, when neither answered."""
    text, sacct_error = _run(
        ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "JobID,State,NodeList,ExitCode,Elapsed,Start,End"])
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    info: dict = {"job_id": job_id}
    if rows:
        last = rows[-1]
        info.update(state=last[1].split()[0], nodes=last[2], exit_code=last[3], elapsed=last[4],
                    attempts=len(rows))
    sc, scontrol_error = _run(["scontrol", "show", "job", job_id])
    comment = re.search(r"^\s*Comment=(.*?)\s*$", sc, re.M)
    if comment and comment.group(1) not in ("", "(null)"):
        info["comment"] = comment.group(1)
    m = re.search(r"Restarts=(\d+)", sc)
    if m:
        info["restarts"] = int(m.group(1))
        st = re.search(r"JobState=(\w+)", sc)
        if st and "state" not in info:
            info["state"] = st.group(1)
    elif rows:
        info["restarts"] = len(rows) - 1
    if sacct_error and scontrol_error and "state" not in info:
        info["slurm_error"] = sacct_error
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


def _last_report(rec: dict) -> dict | None:
    """The monitor's newest report: in the monitor dir, or in the fallback folder the monitor used
    when the run folder could not be written (``monitoring.fallback_dir``)."""
    try:
        from monitoring import storage
        from monitoring.diagnosis import load_last_report
    except ImportError:
        return None
    # the monitor's files of this job: its run folder, else its fallback folder (the stop marker
    # and the decisions are read from there too)
    fallback = ((rec.get("config") or {}).get("monitoring") or {}).get("fallback_dir")
    storage.configure(rec["monitor_dir"], fallback, str(rec["job_id"]))
    try:
        return load_last_report(rec["monitor_dir"])
    except (OSError, ValueError):
        return None


def storage_line(rec: dict, report: dict | None = None, comment: str | None = None) -> str | None:
    """One line naming a storage fault (full / over-quota / read-only / failing file system) that
    ended this job, from its last report, else from the monitor's Slurm job comment."""
    report = report if report is not None else _last_report(rec)
    if report and report.get("kind") == "storage" and str(report.get("job_id")) == str(rec["job_id"]):
        st = report.get("storage") or {}
        return f"{st.get('line') or report.get('summary')}; {st.get('advice', 'free space')}, then resubmit"
    if comment and "storage:" in comment:
        return comment.split("storage:", 1)[1].strip()
    return None


def status(job: str, out=sys.stdout) -> dict:
    rec = resolve(job)
    info = slurm_state(rec["job_id"]) if rec.get("executor", "slurm") == "slurm" else {"job_id": rec["job_id"]}
    info["run_dir"] = rec["run_dir"]
    info["last_step"] = last_step(rec)
    report = _last_report(rec)
    if "state" not in info:
        info["state"] = (f"unknown: Slurm did not answer ({info['slurm_error']})" if info.get("slurm_error")
                         else "unknown: Slurm has no record of it" if rec.get("executor", "slurm") == "slurm"
                         else "not tracked (local executor: see tulu logs)")
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
    storage = storage_line(rec, report, info.get("comment"))
    if storage:
        info["storage"] = storage
        print(f"{'storage':>10}: {storage}", file=out)
    if report:
        info["last_report"] = report
        summary = report.get("summary") or report.get("kind")
        print(f"{'monitor':>10}: last report: {summary}", file=out)
    elif info.get("comment", "").startswith("tulu monitor:"):
        print(f"{'monitor':>10}: {info['comment']}", file=out)
    return info


def cancel(job: str, out=sys.stdout) -> int:
    rec = resolve(job)
    job_id = rec["job_id"]
    if rec.get("executor") == "local":
        raise CommandError("not a Slurm job (it ran with the local executor)", f"job {job_id}",
                           "stop the tulu command that runs it")
    text, error = _run(["scancel", job_id])
    if error:
        raise CommandError("scancel failed", f"job {job_id}", error)
    print(text.strip() or f"cancelled job {job_id}", file=out)
    return 0


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
        while not job.done():   # submitit's own wait polls once a second: up to 1 s more per job
            time.sleep(0.05)
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
