"""Held-out verified accuracy of each pipeline stage's model, per task, and the report files.

    results = {"sft": evaluate_model("run/sft-hf", "data/heldout.jsonl"), "dpo": ..., "rlvr": ...}
    print(accuracy_table(results))
    write_report("run/report", results, curves_png="run/report/pipeline.png")

A stage's result is ``{"n", "accuracy", "per_task": {task: {"n", "accuracy"}}, "examples":
{task: first completion}}``; tasks are verifier registry names (``gsm8k``, ``math``, ``ifeval``).
Results are kept in the order given (the stage order), and each row's delta is against the row
above it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tulu.atomic import write_text_atomic


MISSING = "-"


def evaluate_model(model_dir: str | Path, heldout_jsonl: str | Path, *, max_new_tokens: int = 48,
                   engine: str = "transformers", limit: int | None = None,
                   max_model_len: int = 512, samples_out: str | Path | None = None) -> dict:
    """Greedy completions of the held-out RLVR-schema prompts, scored by the verifiers.

    Prompts longer than ``max_model_len - max_new_tokens`` tokens are skipped (``"skipped"``
    counts them), so compare stages on the same file and settings.
    """
    from tulu.rlvr.evaluate import evaluate

    start = time.perf_counter()
    r = evaluate(model_dir, heldout_jsonl, limit=limit, engine=engine, max_new_tokens=max_new_tokens,
                 max_model_len=max_model_len, samples_out=samples_out)
    return {"n": r["n"], "accuracy": r["accuracy"], "per_task": r["per_task"], "examples": r["examples"],
            "skipped": r["skipped"], "seconds": round(time.perf_counter() - start, 3)}


def _tasks(results: dict[str, dict]) -> list[str]:
    seen: dict[str, None] = {}
    for res in results.values():
        for task in res.get("per_task", {}):
            seen.setdefault(task, None)
    return sorted(seen)


def _n_label(values: list[int]) -> str:
    distinct = sorted(set(values))
    return "n=" + "/".join(str(v) for v in distinct) if distinct else "n=0"


def _rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table (shared by the text and markdown forms)."""
    results = {stage: res for stage, res in results.items() if res}
    tasks = _tasks(results)
    header = ["stage"]
    for task in tasks:
        ns = [res["per_task"][task]["n"] for res in results.values() if task in res.get("per_task", {})]
        header.append(f"{task} ({_n_label(ns)})")
    header += [f"all ({_n_label([res['n'] for res in results.values()])})", "delta all"]
    rows, previous = [], None
    for stage, res in results.items():
        cells = [stage]
        for task in tasks:
            t = res.get("per_task", {}).get(task)
            cells.append(f"{t['accuracy']:.3f}" if t else MISSING)
        cells.append(f"{res['accuracy']:.3f}")
        cells.append(MISSING if previous is None else f"{res['accuracy'] - previous:+.3f}")
        previous = res["accuracy"]
        rows.append(cells)
    return header, rows


def accuracy_table(results: dict[str, dict]) -> str:
    """A fixed-width text table: one row per stage (in the given order), one column per task,
    then ``all`` and the change of ``all`` from the previous stage. Stages whose result is
    empty or None are left out."""
    header, rows = _rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def markdown_table(results: dict[str, dict]) -> str:
    header, rows = _rows(results)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> Path:
    return write_text_atomic(path, text)


def write_report(out_dir: str | Path, results: dict[str, dict],
                 curves_png: str | Path | None = None) -> dict[str, Path]:
    """Write ``accuracy.json`` (the results as given), ``accuracy.txt`` (:func:`accuracy_table`)
    and ``accuracy.md`` (the table, the figure when ``curves_png`` is given, and each stage's
    first completion per task). Each file is written atomically. Returns ``{"json", "txt", "md"}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Held-out verified accuracy", "", markdown_table(results)]
    if curves_png is not None:
        png = Path(curves_png)
        try:
            link = os.path.relpath(png.resolve(), out.resolve())
        except ValueError:  # another drive (Windows); an absolute link still works
            link = str(png.resolve())
        md += [f"![training curves and held-out accuracy]({link})", ""]
    examples = [(stage, task, text) for stage, res in results.items() if res
                for task, text in res.get("examples", {}).items()]
    if examples:
        md += ["## First held-out completion per stage and task", ""]
        for stage, task, text in examples:
            md += [f"**{stage} / {task}**", "", "```", text.replace("```", "`\u200b``"), "```", ""]
    return {
        "json": _write(out / "accuracy.json", json.dumps(results, indent=2, sort_keys=False) + "\n"),
        "txt": _write(out / "accuracy.txt", accuracy_table(results)),
        "md": _write(out / "accuracy.md", "\n".join(md)),
    }
