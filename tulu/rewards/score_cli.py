"""``tulu score IN.jsonl --out OUT.jsonl``: score a file of completions offline.

Each input line is a JSON object in Ai2's RLVR schema plus the model's text: ``dataset``,
``ground_truth``, ``completion`` (and optionally ``ended_with_eos``). Each output line is the same
object with ``reward`` and ``verified`` added (and ``score_error`` when it could not be verified
for a reason other than a wrong answer); line N of the output belongs to line N of the input.
A bad line (not JSON, a missing column, an unknown verifier) is reported on stderr with its line
number, counted, and scored as unverified — it never stops the run. Prints a per-verifier accuracy
table and one JSON summary line on stdout. Exit status: 0 when the file was scored (even with bad
rows), 2 for a usage error or an unreadable input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tulu.rewards.config import RewardConfig
from tulu.rewards.scorer import RewardScorer

MAX_REPORTED_BAD_ROWS = 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tulu score", description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="JSONL with completion, dataset, ground_truth per line")
    p.add_argument("--out", type=Path, required=True, help="where to write the scored JSONL")
    p.add_argument("--workers", type=int, default=2, help="verifier processes (default 2)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per row (default 5)")
    p.add_argument("--verified-reward", type=float, default=10.0, help="default 10")
    p.add_argument("--unverified-reward", type=float, default=0.0, help="default 0")
    p.add_argument(
        "--no-eos-penalty", type=float, default=None,
        help="subtracted when a row has ended_with_eos=false (default: none)",
    )
    return p


def _read_rows(path: Path) -> list[object]:
    """Parsed rows; a line that is not a JSON object becomes a string describing the problem."""
    rows: list[object] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                rows.append("empty line")
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                rows.append(f"not JSON ({exc})")
                continue
            rows.append(row if isinstance(row, dict) else f"not a JSON object ({type(row).__name__})")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1 or not args.timeout > 0:
        print("tulu score: --workers must be >= 1 and --timeout > 0", file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"tulu score: input file not found: {args.input}", file=sys.stderr)
        return 2
    cfg = RewardConfig(
        verified_reward=args.verified_reward,
        unverified_reward=args.unverified_reward,
        no_eos_penalty=args.no_eos_penalty,
    )
    reported = 0

    def warn(lineno: int, message: str) -> None:
        nonlocal reported
        reported += 1
        if reported <= MAX_REPORTED_BAD_ROWS:
            print(f"{args.input}:{lineno}: {message}", file=sys.stderr)

    rows = _read_rows(args.input)
    with RewardScorer(cfg, workers=args.workers, timeout_s=args.timeout) as scorer:
        results = scorer.score(r if isinstance(r, dict) else None for r in rows)
        stats = scorer.stats

    tmp = args.out.with_name(args.out.name + ".tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as f:
        for lineno, (row, res) in enumerate(zip(rows, results), 1):
            out = dict(row) if isinstance(row, dict) else {}
            out["reward"], out["verified"] = res.reward, res.verified
            if isinstance(row, str) or (res.error or "").startswith("bad row"):
                problem = row if isinstance(row, str) else res.error.removeprefix("bad row: ")
                warn(lineno, f"bad row: {problem}")
                out["score_error"] = f"bad row: {problem}"
            elif res.error:
                out["score_error"] = res.error
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    if reported > MAX_REPORTED_BAD_ROWS:
        print(f"{args.input}: … and {reported - MAX_REPORTED_BAD_ROWS} more bad rows", file=sys.stderr)

    head = ("verifier", "rows", "verified", "accuracy", "bad_rows", "errors", "timeouts")
    print(f"{head[0]:<12}" + "".join(f"{h:>10}" for h in head[1:]))
    per = {}
    for name, vs in sorted(stats.per_verifier.items()):
        cells = (vs.rows, vs.verified, f"{vs.accuracy:.3f}", vs.bad_rows, vs.errors, vs.timeouts)
        print(f"{name:<12}" + "".join(f"{c:>10}" for c in cells))
        per[name] = {"rows": vs.rows, "verified": vs.verified, "accuracy": round(vs.accuracy, 6)}
    summary = {
        "summary": "score",
        "input": str(args.input),
        "output": str(args.out),
        "rows": len(rows),
        "verified": stats.verified,
        "accuracy": round(stats.verified / len(rows), 6) if rows else 0.0,
        "per_verifier": per,
        "bad_rows": stats.bad_rows,
        "errors": stats.errors,
        "timeouts": stats.timeouts,
        "workers_replaced": stats.workers_replaced,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
