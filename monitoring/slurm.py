"""The few Slurm commands the monitor runs, and pure parsers of their output.

Parsers take captured text (``scontrol show job -o``, ``sinfo -h -N -o "%N %t"``) so the
policy built on them is unit tested without a cluster. Commands are run through `run`, which
uses whatever ``scontrol``/``sinfo`` is first on PATH (tests put a fake one there).
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Callable
from dataclasses import dataclass

__all__ = ["JobInfo", "parse_job", "parse_sinfo_nodes", "expand_hostlist", "spare_nodes",
           "run", "run_retrying", "show_job", "job_steps", "kill_steps", "SlurmCommandError"]

_KV = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)")
_USABLE = {"idle", "alloc", "allocated", "mix", "mixed", "comp", "completing", "plnd",
           "planned", "resv", "reserved"}


class SlurmCommandError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class JobInfo:
    job_id: str
    state: str            # RUNNING, PENDING, CANCELLED, TIMEOUT, ... (flags stripped)
    restarts: int
    num_nodes: int
    partition: str
    nodes: list[str]
    excluded: list[str]


def parse_job(text: str) -> JobInfo:
    """Fields of ``scontrol show job -o <id>`` (one line of Key=Value pairs)."""
    kv = dict(_KV.findall(text))
    num = kv.get("NumNodes", "1").split("-")[0]
    exc = kv.get("ExcNodeList", "(null)")
    return JobInfo(
        job_id=kv.get("JobId", ""), state=kv.get("JobState", "UNKNOWN").split("+")[0],
        restarts=int(kv.get("Restarts", "0") or 0), num_nodes=int(num or 1),
        partition=kv.get("Partition", ""),
        nodes=expand_hostlist(kv.get("NodeList", "(null)")),
        excluded=expand_hostlist(exc))


def expand_hostlist(expr: str) -> list[str]:
    """'n[1-3,5],gpu7' -> ['n1','n2','n3','n5','gpu7'] (Slurm's hostlist syntax, one bracket
    level, zero padding kept). '(null)' and '' give []."""
    if not expr or expr == "(null)" or expr == "None assigned":
        return []
    out: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", expr):
        m = re.match(r"^(.*)\[([^\]]*)\](.*)$", part)
        if not m:
            out.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{i:0{width}d}{suffix}")
    return out


def parse_sinfo_nodes(text: str) -> dict[str, str]:
    """{node: state} from ``sinfo -h -N -o "%N %t"`` (a node may appear once per partition)."""
    nodes: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            nodes[parts[0]] = parts[1]
    return nodes


def spare_nodes(sinfo_text: str, job: JobInfo, exclude: list[str]) -> tuple[bool, str]:
    """Can the job still be placed with ``exclude`` (and what it already excludes) left out?

    Counts the partition's nodes in a usable state (idle/alloc/mix/completing/...: the job's
    own nodes are freed by the requeue) minus the excluded ones, against the job's node count.
    Returns (ok, explanation)."""
    states = parse_sinfo_nodes(sinfo_text)
    banned = set(exclude) | set(job.excluded)
    usable = sorted(n for n, s in states.items()
                    if s.rstrip("*~#!%$@^-+").lower() in _USABLE and n not in banned)
    ok = len(usable) >= job.num_nodes
    why = (f"{len(usable)} usable node(s) in partition {job.partition or '?'} after excluding "
           f"{sorted(banned) or 'none'}; the job needs {job.num_nodes}")
    return ok, why


def run(args: list[str], timeout: float = 60.0) -> str:
    """Run a Slurm command; stdout on success, `SlurmCommandError` (with stderr) otherwise.
    60 s is submitit's requeue time-out: slurmctld can be slow on a busy cluster."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise SlurmCommandError(f"{args[0]} not found on PATH: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise SlurmCommandError(f"{' '.join(args)} timed out after {timeout:.0f} s") from e
    if out.returncode != 0:
        raise SlurmCommandError(f"{' '.join(args)} failed ({out.returncode}): "
                                f"{out.stderr.strip()[-500:]}")
    return out.stdout


def show_job(job_id: str) -> JobInfo:
    return parse_job(run(["scontrol", "show", "job", "-o", str(job_id)]))


def run_retrying(args: list[str], *, tries: int = 4, backoff_s: float = 2.0,
                 done: Callable[[], bool] | None = None, timeout: float = 60.0) -> str:
    """`run`, retried ``tries`` times in all with a doubling back-off (2, 4, 8 s): slurmctld can
    be unreachable for a few seconds (a restart, a fail-over, a busy RPC queue). Before each
    retry ``done()`` is asked whether the previous try took effect after all (a client time-out
    after the controller acted): then the command is not run again. Raises `SlurmCommandError`
    naming every try's error when all of them failed."""
    errors: list[str] = []
    for i in range(max(1, tries)):
        if i:
            time.sleep(backoff_s * 2 ** (i - 1))
            try:
                if done is not None and done():
                    return ""
            except SlurmCommandError:
                pass
        try:
            return run(args, timeout=timeout)
        except SlurmCommandError as e:
            errors.append(f"try {i + 1}: {e}")
    raise SlurmCommandError(f"{' '.join(args)} failed {len(errors)} time(s): " + "; ".join(errors))


def job_steps(job_id: str, skip_names: tuple[str, ...] = ()) -> list[str]:
    """The job's running srun steps ("77.0", "77.1"), without its batch and extern steps and
    without the steps named in ``skip_names`` (e.g. the monitor agents' step)."""
    out = run(["squeue", "-h", "-s", "-j", str(job_id), "-o", "%i %j"], timeout=20)
    steps = []
    for line in out.splitlines():
        step, _, name = line.strip().partition(" ")
        if step.split(".")[-1].isdigit() and name.strip() not in skip_names:
            steps.append(step)
    return steps


def kill_steps(job_id: str, skip_names: tuple[str, ...] = ()) -> list[str]:
    """SIGKILL every task of the job's srun steps (but those named in ``skip_names``), on every
    node, at once: the batch script and the job survive (a requeue or an in-job restart
    follows). Unlike the requeue's SIGTERM (which Slurm sends with a SIGCONT), a SIGKILL leaves
    a SIGSTOPped rank no time to run on. Returns the steps."""
    steps = job_steps(job_id, skip_names)
    for step in steps:
        run(["scancel", "--signal=KILL", step], timeout=20)
    return steps
