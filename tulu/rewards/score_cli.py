"""``tulu score IN.jsonl --out OUT.jsonl``: score a file of completions offline.

Each input line is a JSON object in Ai2's RLVR schema plus the model's text: ``dataset``,
``ground_truth``, ``completion`` (and optionally ``ended_with_eos``). Each output line is the same
object with ``reward`` and ``verified`` added (and ``score_error`` when it could not be verified
for a reason other than a wrong answer); line N of the output belongs to line N of the input.
A bad line (not UTF-8, not JSON, a missing column, an unknown verifier) is reported on stderr with its line
number, counted, and scored as unverified — it never stops the run. Prints a per-verifier accuracy
table and one JSON summary line on stdout. Exit status: 0 when the file was scored (even with bad
rows), 2 for a usage error or an unreadable input. The input is only read: an ``--out`` that is
the input file (also through a link) is refused, and the output appears whole (a temporary file
in its folder, renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tulu.atomic import open_atomic
from tulu.errors import CommandError

MAX_REPORTED_BAD_ROWS = 20


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _path(text: str) -> Path:
    return Path(text).expanduser()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=_path, help="JSONL with completion, dataset, ground_truth per line")
    p.add_argument("--out", type=_path, required=True,
                   help="where to write the scored JSONL (never the input file)")
    p.add_argument("--workers", type=_positive(int), default=2, help="verifier processes (default 2)")
    p.add_argument("--timeout", type=_positive(float), default=5.0, help="seconds per row (default 5)")
    p.add_argument("--verified-reward", type=float, default=10.0, help="default 10")
    p.add_argument("--unverified-reward", type=float, default=0.0, help="default 0")
    p.add_argument(
        "--no-eos-penalty", type=float, default=None,
        help="subtracted when a row has ended_with_eos=false (default: none)",
    )


def _check_paths(src: Path, out: Path) -> None:
    """Refuse before any work: an unreadable input, an output that is a folder or the input."""
    if not src.exists():
        raise CommandError("input file not found", src)
    if src.is_dir():
        raise CommandError("the input is a folder, not a file", src)
    try:
        with src.open("rb"):
            pass
    except PermissionError:
        raise CommandError("cannot read the input (permission denied)", src) from None
    if out.is_dir():
        raise CommandError("--out is a folder, not a file", out, "name the scored file, e.g. --out scored.jsonl")
    if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(src, out)):  # a link, `x/../in`
        raise CommandError("--out is the input file", out, "write the scored copy to another file")


def _read_rows(path: Path) -> list[object]:
    """Parsed rows; a line that is not a JSON object (or not UTF-8) becomes a string describing
    the problem."""
    rows: list[object] = []
    with path.open("rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                continue
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


def run(args: argparse.Namespace) -> int:
    _check_paths(args.input, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file is made first (an unwritable folder fails now, not after scoring), with a
    # name of its own: it can never be the input.
    with open_atomic(args.out) as f:
        rows, stats = _score(args, f)
    _report(args, rows, stats)
    return 0


def _score(args: argparse.Namespace, f) -> tuple[list[object], object]:
    """Score every row of the input and write the scored lines to `f`; bad rows go to stderr."""
    from tulu.rewards.config import RewardConfig
    from tulu.rewards.scorer import RewardScorer

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
    if reported > MAX_REPORTED_BAD_ROWS:
        print(f"{args.input}: … and {reported - MAX_REPORTED_BAD_ROWS} more bad rows", file=sys.stderr)
    return rows, stats


def _report(args: argparse.Namespace, rows: list[object], stats) -> None:
    """The per-verifier table and one JSON summary line on stdout."""
    head = ("verifier", "rows", "verified", "accuracy", "bad_rows", "errors", "timeouts")
    print(f"{head[0]:<12}" + "".join(f"{h:>10}" for h in head[1:]))
    per = {}
    for name, vs in sorted(stats.per_verifier.items()):
        cells = (vs.rows, vs.verified, f"{vs.accuracy:.3f}", vs.bad_rows, vs.errors, vs.timeouts)
        print(f"{name:<12}" + "".join(f"{c:>10}" for c in cells))
        per[name] = {"rows": vs.rows, "verified": vs.verified, "accuracy": round(vs.accuracy, 6)}
    if "math" in per:
        from tulu.rewards.hendrycks_math import MATH_RULE

        print(MATH_RULE)
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


def main(argv: list[str] | None = None) -> int:
    """`python -m tulu.rewards.score_cli ...` is `tulu score ...`."""
    from tulu.cli import main as cli_main

    return cli_main(["score", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
