"""`tulu pipeline CONFIG`: the task data, then SFT -> on-policy DPO pairs -> DPO -> RLVR ->
evaluation as jobs, each starting from the previous one's committed checkpoint.

On Slurm the whole chain is submitted at once, each job `afterok` on the one before it (a failed
job makes Slurm cancel the rest: `--kill-on-invalid-dep=yes`); a requeued job keeps its id, so
the chain waits through preemptions and monitor restarts. With submitit's local executor the
jobs run one after another on this machine. The driver waits by default, showing the step of
the running stage, and prints the held-out accuracy table at the end; a failed step stops the
chain and names its log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tulu.atomic import is_temp_name, write_text_atomic
from tulu.config.schema import ConfigError
from tulu.deletion import DeleteRefused, refusal, remove_tree
from tulu.errors import CommandError
from tulu.pipeline.config import STAGE_ORDER, Pipeline

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED"}


@dataclass
class Step:
    name: str                      # sft, pairs, dpo, rlvr, eval
    run_dir: Path
    total_steps: int | None = None
    job: object = None             # submitit job
    job_id: str = ""
    state: str = "PLANNED"
    started: float = 0.0
    ended: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs" / self.job_id

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.glob("*_log.err")) + sorted(self.log_dir.glob("*_log.out"))

    def done_steps(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return 0
        last = 0
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            if row.get("kind") == "train":
                last = max(last, int(row.get("step", 0)))
        return last


def slurm_is_up(timeout_s: float = 10.0) -> bool:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = r.stdout.split()
    return r.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states)


def choose_executor(pipeline: Pipeline) -> str:
    """`auto` -> slurm when the cluster answers, else local; every stage job is re-validated with it."""
    kind = pipeline.settings.executor
    if kind == "auto":
        kind = "slurm" if slurm_is_up() else "local"
    for stage, cfg in pipeline.jobs.items():
        cfg.cluster.executor = kind
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"stages.{stage}.{e.key}", f"{str(e).split(': ', 1)[-1]} (executor {kind})") from None
    return kind


def plan_stages(pipeline: Pipeline) -> dict:
    """Every stage's rank plan, before anything is written or submitted; errors name the YAML path."""
    from tulu.plan.layout import build_plan

    plans = {}
    for stage, cfg in pipeline.jobs.items():
        try:
            plans[stage] = build_plan(cfg)
        except ConfigError as e:
            raise ConfigError(f"stages.{stage}.{e.key}", str(e).split(": ", 1)[-1]) from None
    return plans


def build_steps(pipeline: Pipeline) -> list[Step]:
    steps = []
    for stage, cfg in pipeline.jobs.items():
        if stage == "dpo":
            steps.append(Step("pairs", pipeline.stage_dir("pairs")))
        total = cfg.rlvr.steps if stage == "rlvr" else cfg.stage_config.max_steps
        steps.append(Step(stage, cfg.run_dir.resolve(), total_steps=total))
    steps.append(Step("eval", pipeline.stage_dir("eval")))
    return steps


def _submit(pipeline: Pipeline, step: Step, plans: dict, after_ok: str | None) -> None:
    from tulu.launch import executor
    from tulu.pipeline import steps as fns

    settings = pipeline_settings_dict(pipeline)
    first = pipeline.jobs[next(iter(pipeline.jobs))]
    cluster = _step_cluster(pipeline, first)
    if step.name in pipeline.jobs:
        cfg = pipeline.jobs[step.name]
        step.job = executor.submit(cfg, plans[step.name], pipeline.source, after_ok=after_ok)
    elif step.name == "pairs":
        step.job = executor.submit_call(fns.pairs_step, str(pipeline.dir), settings,
                                        name=f"{pipeline.settings.name}-pairs", run_dir=step.run_dir,
                                        cluster=cluster, after_ok=after_ok)
    else:
        step.job = executor.submit_call(fns.evaluate_step, str(pipeline.dir), settings, list(pipeline.jobs),
                                        name=f"{pipeline.settings.name}-eval", run_dir=step.run_dir,
                                        cluster=cluster, after_ok=after_ok)
    step.job_id = str(step.job.job_id)
    step.state = "PENDING"


def _step_cluster(pipeline: Pipeline, cfg):
    import copy

    cluster = copy.copy(cfg.cluster)
    cluster.time_limit_min = pipeline.settings.stage_time_limit_min
    return cluster


def pipeline_settings_dict(pipeline: Pipeline) -> dict:
    from tulu.config.schema import to_dict

    return to_dict(pipeline.settings)


# What a pipeline writes at the top of its folder (besides pipeline.json and a crashed write's
# temporary `.pipeline.json.*.tmp`); `--fresh` deletes these and nothing else.
PIPELINE_ENTRIES = frozenset({"data", *STAGE_ORDER, "pairs", "eval", "pipeline.tmp"})


def folder_owner(folder: Path) -> str | None:
    """The pipeline named by `folder`/pipeline.json, or None (no record, or not readable)."""
    try:
        rec = json.loads((folder / "pipeline.json").read_text())
    except (OSError, ValueError):
        return None
    return rec.get("name") if isinstance(rec, dict) else None


def check_folder(pipeline: Pipeline) -> None:
    """The pipeline's folder must be new, empty or its own (a pipeline.json naming it)."""
    root, name = pipeline.dir, pipeline.settings.name
    if not root.exists():
        return
    if not root.is_dir():
        raise CommandError("pipeline.dir is not a folder", root)
    owner = folder_owner(root)
    if owner is not None and owner != name:
        raise CommandError("the pipeline folder belongs to another pipeline", root,
                           f"its pipeline.json names {owner!r}, not {name!r}; set pipeline.name or pipeline.dir")
    if owner is None and any(root.iterdir()):
        raise CommandError("the pipeline folder holds files and no pipeline.json", root,
                           "it was not made by a pipeline; set pipeline.dir (or pipeline.name) to a new folder")


def fresh_entries(pipeline: Pipeline) -> tuple[list[Path], list[Path]]:
    """What `--fresh` deletes (what this pipeline wrote) and keeps (anything else) in its folder;
    refuses a folder this pipeline did not make. Deletes nothing."""
    root, name = pipeline.dir, pipeline.settings.name
    if not root.exists():
        return [], []
    reason = refusal(root)
    if reason:
        raise DeleteRefused(root, reason)
    if not root.is_dir():
        raise CommandError("pipeline.dir is not a folder", root)
    entries = sorted(root.iterdir())
    owner = folder_owner(root)
    if entries and owner != name:
        why = "has no pipeline.json" if owner is None else f"its pipeline.json names {owner!r}"
        raise DeleteRefused(root, f"--fresh empties only a folder that pipeline {name!r} made, and this one {why}; "
                                  "delete it yourself or set pipeline.dir")
    delete = [e for e in entries if e.name in PIPELINE_ENTRIES or is_temp_name(e.name, "pipeline.json")]
    return delete, [e for e in entries if e not in delete and e.name != "pipeline.json"]


def start_fresh(pipeline: Pipeline, out=sys.stdout) -> None:
    """Delete what this pipeline wrote in its folder, keep anything else (and pipeline.json, which
    the new run rewrites: the folder stays the pipeline's)."""
    delete, keep = fresh_entries(pipeline)
    for entry in delete:
        remove_tree(entry)
    if delete:
        print(f"--fresh: deleted {', '.join(e.name for e in delete)} in {pipeline.dir}", file=out)
    if keep:
        print(f"--fresh: kept {', '.join(e.name for e in keep)} (not written by the pipeline)", file=out)


def _record(pipeline: Pipeline, kind: str, steps: list[Step]) -> None:
    rec = {"name": pipeline.settings.name, "config": pipeline.source, "executor": kind, "submitted": time.time(),
           "steps": [{"step": s.name, "job_id": s.job_id, "run_dir": str(s.run_dir), "log_dir": str(s.log_dir)}
                     for s in steps]}
    path = pipeline.dir / "pipeline.json"
    write_text_atomic(path, json.dumps(rec, indent=1))


class Progress:
    """One line per change on a pipe; a tqdm bar per stage on a terminal."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.tty = out.isatty()
        self.bar = None
        self.bar_step = None
        self.last: dict[str, tuple] = {}

    def show(self, step: Step) -> None:
        done = step.done_steps() if step.total_steps else 0
        key = (step.state, done * 10 // max(1, step.total_steps or 1))
        if self.tty and step.state == "RUNNING" and step.total_steps:
            from tqdm import tqdm

            if self.bar_step is not step:
                self.close()
                self.bar = tqdm(total=step.total_steps, desc=f"{step.name:>5}", unit="step", file=self.out,
                                dynamic_ncols=True)
                self.bar_step = step
            self.bar.n = done
            self.bar.refresh()
            return
        if self.last.get(step.name) != key:
            self.close()
            extra = f" step {done}/{step.total_steps}" if step.total_steps and step.state == "RUNNING" else ""
            elapsed = f" ({step.ended - step.started:.0f} s)" if step.ended and step.started else ""
            print(f"[{time.strftime('%H:%M:%S')}] {step.name:>5}: job {step.job_id} {step.state}{extra}{elapsed}",
                  file=self.out, flush=True)
            self.last[step.name] = key

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar_step.done_steps()
            self.bar.close()
            self.bar, self.bar_step = None, None


def _state(kind: str, step: Step) -> str:
    if kind == "local":
        if not step.job.done():
            return "RUNNING"
        return "FAILED" if step.job.exception() is not None else "COMPLETED"
    from tulu.launch.ops import slurm_state

    return slurm_state(step.job_id).get("state", "PENDING")


def _watch(kind: str, steps: list[Step], progress: Progress, poll_s: float, until: Step) -> Step | None:
    """Poll until `until` completes; returns the first step that failed, if any."""
    while True:
        for s in steps:
            if not s.job_id or s.state in ("COMPLETED",) or s.state in FAILED_STATES:
                continue
            new = _state(kind, s)
            if new == "RUNNING" and not s.started:
                s.started = time.time()
            if new in ("COMPLETED", *FAILED_STATES):
                s.ended = time.time()
            if new != s.state or new == "RUNNING":
                s.state = new
                progress.show(s)
            if new in FAILED_STATES:
                return s
        if until.state == "COMPLETED":
            return None
        time.sleep(poll_s)


def report_failure(step: Step, steps: list[Step], kind: str, out) -> None:
    print(f"\npipeline stopped: {step.name} (job {step.job_id}) ended {step.state}", file=out)
    try:
        from monitoring.recovery import stop_reason

        reason = stop_reason(str(step.run_dir / "monitor"), step.job_id)
    except (ImportError, OSError, ValueError):
        reason = None
    if reason:
        print(f"  monitor: {reason}", file=out)
    for f in step.log_files()[:2]:
        print(f"  log: {f}", file=out)
        tail = f.read_text(errors="replace").strip().splitlines()[-12:]
        for line in tail:
            print(f"    {line}", file=out)
    print(f"  tulu logs {step.run_dir}   # every task's log of this stage", file=out)
    rest = [s for s in steps if s.job_id and s.state not in ("COMPLETED", *FAILED_STATES)]
    if kind == "slurm" and rest:
        subprocess.run(["scancel", *[s.job_id for s in rest]], capture_output=True, timeout=60)
        print(f"  cancelled the later steps: {', '.join(f'{s.name} ({s.job_id})' for s in rest)}", file=out)


def run(pipeline: Pipeline, *, wait: bool = True, fresh: bool = False, poll_s: float = 2.0, out=sys.stdout) -> int:
    from tulu.pipeline import steps as fns

    kind = choose_executor(pipeline)
    plans = plan_stages(pipeline)
    if fresh:
        start_fresh(pipeline, out)
    check_folder(pipeline)
    _record(pipeline, kind, [])  # the folder is this pipeline's from now on (what --fresh checks)
    t0 = time.time()
    files = fns.write_data(pipeline.data_dir, pipeline.settings)
    counts = {k: sum(1 for _ in open(v)) for k, v in files.items() if str(v).endswith(".jsonl")}
    print(f"pipeline {pipeline.settings.name}: {pipeline.dir} ({kind} executor)", file=out)
    print(f"  task data: {', '.join(f'{k} {n}' for k, n in counts.items())} rows "
          f"({', '.join(pipeline.settings.tasks.names)}; seed {pipeline.settings.seed}; {time.time() - t0:.1f} s)",
          file=out, flush=True)
    steps = build_steps(pipeline)
    progress = Progress(out)
    if kind == "slurm":
        previous = None
        for s in steps:
            _submit(pipeline, s, plans, previous)
            previous = s.job_id
        _record(pipeline, kind, steps)
        print("  jobs: " + " -> ".join(f"{s.name} {s.job_id}" for s in steps) + "   (sacct -X shows them)",
              file=out, flush=True)
        if not wait:
            return 0
        failed = _watch(kind, steps, progress, poll_s, until=steps[-1])
    else:
        failed = None
        for s in steps:
            _submit(pipeline, s, plans, None)
            _record(pipeline, kind, steps)
            failed = _watch(kind, steps, progress, poll_s, until=s)
            if failed:
                break
    progress.close()
    if failed:
        report_failure(failed, steps, kind, out)
        return 1
    print(f"\npipeline {pipeline.settings.name} finished in {time.time() - t0:.0f} s", file=out)
    table = pipeline.dir / "eval" / "accuracy.txt"
    if table.exists():
        print(table.read_text(), file=out)
    for name in ("curves.png", "accuracy.md", "accuracy.json"):
        if (pipeline.dir / "eval" / name).exists():
            print(f"  {pipeline.dir / 'eval' / name}", file=out)
    return 0
