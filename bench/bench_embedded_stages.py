"""Does each stage of the embedded default raise held-out accuracy beyond noise? The stage models
of finished pipeline runs (e.g. seeds 1-3), re-scored on a held-out set larger than the
pipeline's own (100 per task), then paired stage against stage.

    .venv/bin/python bench/bench_embedded_stages.py runs/s1 runs/s2 runs/s3 [--per-task 300]

For each run: held-out prompts of each task of its data (seed, tasks, difficulty from
`<run>/data/card.json`), as many
as ``--per-task`` or as many distinct ones as the task's difficulty has (math with denominators
up to 6: 114), written to ``<run>/eval-large/heldout.jsonl``; each stage's exported model
(`<run>/<stage>/hf`, and the untrained one, `<run>/eval/untrained-hf`) answers them greedily
(the pipeline's evaluator and token budget) into ``<run>/eval-large/eval/samples-<stage>.jsonl``. Then `tulu.pipeline.paired` over all runs: one
JSON line per stage transition and task (gain, standard error, n), appended to
bench/results/embedded_stages-DATE.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tulu.data.synthetic import write_jsonl  # noqa: E402
from tulu.data.tasks import heldout_rows_up_to  # noqa: E402
from tulu.pipeline.config import EVAL_ORDER, UNTRAINED  # noqa: E402
from tulu.pipeline.paired import compare, table  # noqa: E402
from tulu.pipeline.report import evaluate_model  # noqa: E402
from tulu.pipeline.steps import untrained_dir  # noqa: E402


def heldout_rows(data: dict, per_task: int) -> tuple[list[dict], dict[str, int]]:
    """Up to ``per_task`` distinct held-out prompts of each task of a run's data card (all there
    are when fewer)."""
    rows, counts = [], {}
    for task in data["names"]:
        mine = heldout_rows_up_to(task, per_task, data["seed"], difficulty=data["difficulty"])
        counts[task] = len(mine)
        rows += mine
    return rows, counts


def score_run(run: Path, per_task: int, max_new_tokens: int) -> dict:
    data = json.loads((run / "data" / "card.json").read_text())["pipeline"]
    out = run / "eval-large"
    rows, counts = heldout_rows(data, per_task)
    heldout = write_jsonl(rows, out / "heldout.jsonl")
    accuracy = {}
    for stage in EVAL_ORDER:
        hf = untrained_dir(run) if stage == UNTRAINED else run / stage / "hf"
        if not hf.is_dir():
            continue
        r = evaluate_model(hf, heldout, max_new_tokens=max_new_tokens,
                           samples_out=out / "eval" / f"samples-{stage}.jsonl")
        accuracy[stage] = {"all": round(r["accuracy"], 4), **{t: v["accuracy"] for t, v in r["per_task"].items()}}
    return {"run": str(run), "seed": data["seed"], "heldout_per_task": counts, "accuracy": accuracy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--per-task", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="the pipeline's pipeline.eval.max_new_tokens")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    lines = [{"figure": "run", **score_run(run, a.per_task, a.max_new_tokens)} for run in a.runs]
    rows = compare([run / "eval-large" for run in a.runs])
    lines += [{"figure": "paired_gain", **r} for r in rows]
    report(lines, rows, {"bench": "embedded_stages", "runs": [str(r) for r in a.runs]}, t0, save=not a.no_save)
    return 0


def report(lines: list[dict], rows: list[dict], stamp: dict, t0: float, *, save: bool) -> None:
    """Print each figure as a JSON line (with ``stamp``, the date and the wall time) and the paired
    table; append the lines to bench/results/<stamp's bench>-DATE.jsonl when ``save``."""
    stamp = {**stamp, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "wall_s": round(time.time() - t0, 1)}
    for line in lines:
        print(json.dumps({**line, **stamp}), flush=True)
    print(table(rows), file=sys.stderr)
    if save:
        path = REPO / "bench" / "results" / f"{stamp['bench']}-{datetime.now(timezone.utc).date()}.jsonl"
        with open(path, "a") as f:
            f.writelines(json.dumps({**line, **stamp}) + "\n" for line in lines)


if __name__ == "__main__":
    raise SystemExit(main())
