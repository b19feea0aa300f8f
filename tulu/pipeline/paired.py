"""Did a stage raise held-out accuracy beyond noise? Paired differences over one or more pipeline
runs (e.g. seeds 1-3), per task and overall.

Each run's evaluation writes ``eval/samples-<stage>.jsonl`` (one line per held-out prompt, with
its verdict). Stage B is compared with the stage before it, A, item by item: the difference of
the 0/1 verdicts on the same prompt of the same run. Its mean is the accuracy gain; its standard
error is sd/sqrt(n) with n items (runs x prompts), so a gain of more than two standard errors is
one that the sampling of prompts hardly explains.

    python -m tulu.pipeline.paired runs/tiny-cpu-s1 runs/tiny-cpu-s2 runs/tiny-cpu-s3 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

from tulu.pipeline.config import EVAL_ORDER

ALL = "all"


def read_verdicts(run_dir: str | Path, stage: str) -> dict[tuple[str, str], bool]:
    """(task, prompt) -> verified, from one run's ``eval/samples-<stage>.jsonl``."""
    path = Path(run_dir) / "eval" / f"samples-{stage}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no evaluation of stage {stage} in {run_dir}")
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["task"], row["prompt"]] = bool(row["verified"])
    return out


def paired_difference(diffs: Sequence[int]) -> dict:
    """Mean, standard error and z of per-item differences (each -1, 0 or +1)."""
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n) if n else 0.0
    return {"n": n, "gain": mean, "se": se, "z": mean / se if se else (math.inf if mean > 0 else 0.0)}


def compare(run_dirs: Sequence[str | Path], stages: Sequence[str] | None = None) -> list[dict]:
    """One row per (stage after the first, task or ``all``): the paired gain over the stage before."""
    stages = list(stages or [s for s in EVAL_ORDER
                             if all((Path(r) / "eval" / f"samples-{s}.jsonl").exists() for r in run_dirs)])
    if len(stages) < 2:
        raise ValueError(f"need two evaluated stages in every run; found {stages or 'none'}")
    verdicts = {s: [read_verdicts(r, s) for r in run_dirs] for s in stages}
    rows = []
    for before, after in zip(stages, stages[1:]):
        by_task: dict[str, list[int]] = {}
        for run, (a, b) in enumerate(zip(verdicts[before], verdicts[after])):
            if a.keys() != b.keys():
                raise ValueError(f"{run_dirs[run]}: stages {before} and {after} were evaluated on different prompts")
            for key in a:
                d = int(b[key]) - int(a[key])
                by_task.setdefault(key[0], []).append(d)
                by_task.setdefault(ALL, []).append(d)
        for task in sorted(by_task, key=lambda t: (t == ALL, t)):
            rows.append({"from": before, "to": after, "task": task, **paired_difference(by_task[task])})
    return rows


def table(rows: list[dict]) -> str:
    width = max([len("stage")] + [len(r["from"]) + 2 + len(r["to"]) for r in rows])
    lines = [f"{'stage':<{width}} {'task':<8} {'n':>5} {'gain':>7} {'SE':>6} {'gain/SE':>8}"]
    for r in rows:
        lines.append(f"{r['from'] + '->' + r['to']:<{width}} {r['task']:<8} {r['n']:>5} {r['gain']:>+7.3f} "
                     f"{r['se']:>6.3f} {r['z']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tulu.pipeline.paired", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="pipeline run folders (each with eval/samples-<stage>.jsonl)")
    ap.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
    a = ap.parse_args(argv)
    try:
        rows = compare(a.runs)
    except (OSError, ValueError) as e:
        ap.exit(2, f"tulu paired: {e}\n")
    print("\n".join(json.dumps(r) for r in rows) if a.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
