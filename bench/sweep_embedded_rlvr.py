"""RLVR settings tried from finished pipelines' DPO models: does a setting raise held-out accuracy
over DPO, per task, beyond noise? The sweep behind the README's RLVR sweep notes, in the repo.

    .venv/bin/python bench/sweep_embedded_rlvr.py runs/s1 runs/s2 runs/s3 --tag kl05 \\
        --set stages.rlvr.rlvr.kl_beta=0.5 [--rlvr-tasks gsm8k] [--per-task 300]

For each finished pipeline RUN (its `data/` and `dpo/checkpoints`): a new folder
``runs/<RUN name>-<tag>`` gets a copy of both, and the pipeline's own rlvr job (the config's
stage, ``--set`` overrides applied, the run's seed) trains from that DPO model through the local
executor; ``--rlvr-tasks`` keeps only those tasks' RLVR training prompts. The RLVR model and the
DPO model answer the larger held-out set of `bench_embedded_stages.py` greedily (the DPO answers
are reused from ``RUN/eval-large`` when that run was scored there). One JSON line per run (accuracy
per task, training reward per task over the first and last 40 steps, the word problems' steps:
how many first facts, second facts, carried results and final answers were right), then the
paired DPO -> RLVR gain per task over all runs (`tulu.pipeline.paired`); appended to
bench/results/sweep_embedded_rlvr-DATE.jsonl unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_embedded_stages import heldout_rows, report  # noqa: E402
from tulu.data.synthetic import write_jsonl  # noqa: E402
from tulu.pipeline.paired import compare  # noqa: E402

CHAIN = re.compile(r"(\d+)([-+*])(\d+)=(\d+)\. (\d+)([-+*])(\d+)=(\d+)\. The answer is (\d+)\.")
SWEEP_ENTRIES = {"data", "dpo", "rlvr", "eval-large", "pipeline.json"}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def word_problem_steps(samples: list[dict]) -> dict:
    """Of the two-step word-problem answers: how many wrote the chain "a?b=c. x?y=z. The answer is
    A.", and of those how many first facts (a?b=c), second facts (x?y=z), carried results (x=c)
    and final answers (A=z) were right. Where the accuracy is lost, step by step."""
    rows = [s for s in samples if s["task"] == "gsm8k"]
    out = {"n": len(rows), "verified": sum(bool(s["verified"]) for s in rows), "chains": 0,
           "first_fact": 0, "second_fact": 0, "carried": 0, "answer_is_result": 0}
    for s in rows:
        m = CHAIN.match(s["completion"].strip())
        if not m:
            continue
        a, op, b, c, x, op2, y, z, answer = m.groups()
        out["chains"] += 1
        out["first_fact"] += OPS[op](int(a), int(b)) == int(c)
        out["second_fact"] += OPS[op2](int(x), int(y)) == int(z)
        out["carried"] += x == c
        out["answer_is_result"] += answer == z
    return out


def training_reward(metrics: Path, window: int = 40) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == "train"]
    out = {}
    for key in sorted({k for r in rows for k in r if k.startswith("verified_")}):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            first, last = values[:window], values[-window:]
            out[key[len("verified_"):]] = [round(sum(first) / len(first), 3), round(sum(last) / len(last), 3)]
    return out


def prepare(run: Path, folder: Path, rlvr_tasks: list[str] | None) -> None:
    """``folder`` holds a copy of the run's task data and DPO checkpoints, nothing else."""
    if folder.exists():
        foreign = sorted({p.name for p in folder.iterdir()} - SWEEP_ENTRIES)
        if foreign:
            raise SystemExit(f"{folder}: holds {', '.join(foreign)}, which this sweep did not write; "
                             "choose another --tag")
        shutil.rmtree(folder)  # an earlier try of this sweep
    folder.mkdir(parents=True)
    shutil.copytree(run / "data", folder / "data")
    shutil.copytree(run / "dpo" / "checkpoints", folder / "dpo" / "checkpoints")
    if rlvr_tasks:
        train = folder / "data" / "rlvr_train.jsonl"
        kept = [line for line in train.read_text().splitlines() if json.loads(line)["dataset"] in rlvr_tasks]
        if not kept:
            raise SystemExit(f"--rlvr-tasks {','.join(rlvr_tasks)}: no such RLVR prompts in {train}")
        train.write_text("\n".join(kept) + "\n")


def train_rlvr(config: str, folder: Path, seed: int, overrides: list[str]) -> float:
    from tulu.launch import executor
    from tulu.pipeline import driver
    from tulu.pipeline.config import load_pipeline
    from tulu.pipeline.steps import export_stage

    # pipeline.dir makes the stage folders land in `folder` whatever its name
    pipeline = load_pipeline(config, [f"pipeline.name={folder.name}", f"pipeline.dir={folder}",
                                      f"pipeline.seed={seed}", "pipeline.executor=local", *overrides])
    driver.choose_executor(pipeline)
    plans = driver.plan_stages(pipeline)
    t0 = time.perf_counter()
    executor.submit(pipeline.jobs["rlvr"], plans["rlvr"], pipeline.source).results()
    export_stage(folder / "rlvr")
    return time.perf_counter() - t0


def score(model: Path, heldout: Path, samples: Path, max_new_tokens: int) -> list[dict]:
    from tulu.pipeline.report import evaluate_model

    if not samples.exists():
        evaluate_model(model, heldout, max_new_tokens=max_new_tokens, samples_out=samples)
    return [json.loads(line) for line in samples.read_text().splitlines()]


def sweep_run(run: Path, a) -> dict:
    card = json.loads((run / "data" / "card.json").read_text())["pipeline"]
    folder = REPO / "runs" / f"{run.name}-{a.tag}"
    prepare(run, folder, a.rlvr_tasks)
    rlvr_s = train_rlvr(a.config, folder, card["seed"], a.set)
    rows, counts = heldout_rows(card, a.per_task)
    out = folder / "eval-large"
    heldout = write_jsonl(rows, out / "heldout.jsonl")
    scored = run / "eval-large"
    dpo_samples = scored / "eval" / "samples-dpo.jsonl"
    same = (scored / "heldout.jsonl").exists() and (scored / "heldout.jsonl").read_bytes() == heldout.read_bytes()
    (out / "eval").mkdir(parents=True, exist_ok=True)
    if same and dpo_samples.exists():
        shutil.copy(dpo_samples, out / "eval" / "samples-dpo.jsonl")
    accuracy, steps = {}, {}
    for stage, model in (("dpo", run / "dpo" / "hf"), ("rlvr", folder / "rlvr" / "hf")):
        samples = score(model, heldout, out / "eval" / f"samples-{stage}.jsonl", a.max_new_tokens)
        by_task = {}
        for s in samples:
            by_task.setdefault(s["task"], []).append(bool(s["verified"]))
        accuracy[stage] = {t: round(sum(v) / len(v), 3) for t, v in sorted(by_task.items())}
        accuracy[stage]["all"] = round(sum(bool(s["verified"]) for s in samples) / len(samples), 3)
        steps[stage] = word_problem_steps(samples)
    return {"figure": "run", "run": str(run), "folder": str(folder), "seed": card["seed"], "heldout_per_task": counts,
            "rlvr_s": round(rlvr_s, 1), "accuracy": accuracy, "word_problem_steps": steps,
            "training_reward_first_last_40": training_reward(folder / "rlvr" / "metrics.jsonl")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished pipeline folders (data/, dpo/checkpoints, dpo/hf)")
    ap.add_argument("--tag", required=True, help="names the sweep folders: runs/<run>-<tag>")
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a pipeline override, e.g. stages.rlvr.rlvr.kl_beta=0.5 (repeatable)")
    ap.add_argument("--rlvr-tasks", type=lambda s: s.split(","), default=None,
                    help="train RLVR on these tasks' prompts only, e.g. gsm8k (scored on all)")
    ap.add_argument("--per-task", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="the pipeline's pipeline.eval.max_new_tokens")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", a.tag):
        ap.error(f"--tag {a.tag!r}: letters, digits, '_', '.', '-' only (it names folders)")
    t0 = time.time()
    lines = [sweep_run(run.resolve(), a) for run in a.runs]
    rows = compare([Path(line["folder"]) / "eval-large" for line in lines], ["dpo", "rlvr"])
    lines += [{"figure": "paired_gain", **r} for r in rows]
    report(lines, rows, {"bench": "sweep_embedded_rlvr", "tag": a.tag, "set": a.set, "rlvr_tasks": a.rlvr_tasks},
           t0, save=not a.no_save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
