"""Verifiable task data for the embedded pipeline (SFT -> DPO -> RLVR on a tiny model, on CPU).

Three families, generated from templates, deterministic by seed, each scored by the project's
real verifier (the row's ``dataset``):

  ``gsm8k``   word problems, + - and single-digit *      "23+18=41. The answer is 41."   (gsm8k)
  ``math``    fraction sums, boxed, equivalence checked   "\\boxed{\\frac{6}{9}}" = "\\frac{2}{3}" (MATH)
  ``ifeval``  a sentence under one constraint, Ai2's func_name ground truth            (ifeval)

A problem is held out by a hash of its key (the problem without its wording, see
:mod:`tulu.data.tasks.problem`): about a fifth of all problems, never drawn for training, so
train and held-out rows never share a prompt, nor a rephrasing of one. Training rows are drawn
with repetition; held-out rows are distinct prompts, of which there are about 480 (ifeval), 700
(math) and many thousands (gsm8k) per task at the generators' default difficulty; smaller numbers
(``difficulty``, :data:`DIFFICULTY`) leave fewer (math with denominators up to 6: about 110). Prompts stay under 90 bytes and answers under 48, so
a chat fits in 160 tokens of the byte-level tokenizer.

    rows = task_rows("math", "heldout", 256, seed=0)       # Ai2's RLVR schema
    chats = sft_rows("ifeval", 1000, seed=0)                # {"messages": [user, assistant]}
    paths = write_task_data("data/", seed=0, train_per_task=2000, heldout_per_task=128,
                            sft_per_task=2000)

    python -m tulu.data.tasks OUT_DIR --seed 0
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from tulu.atomic import write_text_atomic
from tulu.data.synthetic import write_jsonl
from tulu.data.tasks import gsm8k, ifeval, math_fractions
from tulu.data.tasks.problem import HELDOUT_PER_MILLE, Problem, is_heldout

TASKS = ("gsm8k", "math", "ifeval")
SPLITS = ("train", "heldout")
_FAMILIES = {"gsm8k": gsm8k, "math": math_fractions, "ifeval": ifeval}
VERIFIERS = {task: module.VERIFIER for task, module in _FAMILIES.items()}
"""The verifier (the rows' ``dataset``) of each task, as registered in :mod:`tulu.rewards`."""
DIFFICULTY = {"gsm8k": {"max_operand": gsm8k.MAX_OPERAND, "steps": 1},
              "math": {"max_denominator": math_fractions.MAX_DENOMINATOR}}
"""Each task's difficulty knobs (keywords of its ``draw``) and their defaults; ifeval has none.
``difficulty={"gsm8k": {"max_operand": 10, "steps": 2}}`` asks smaller numbers in two-step stories."""

_MAX_FRUITLESS_DRAWS = 50_000
"""Held-out rows are distinct prompts; after this many draws in a row without a new one the
held-out space counts as exhausted (the rarest prompts are drawn about once in 11k draws)."""


def _family(task: str):
    if task not in _FAMILIES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return _FAMILIES[task]


class HeldOutExhausted(ValueError):
    """Fewer distinct held-out prompts of ``task`` exist (at its difficulty) than were asked for."""

    def __init__(self, task: str, found: int, asked: int) -> None:
        self.task, self.found, self.asked = task, found, asked
        super().__init__(f"found only {found} distinct held-out {task} prompts, {asked} asked for; ask for fewer")


def problems(task: str, split: Literal["train", "heldout"], n: int, seed: int,
             stream: str = "rlvr", difficulty: Mapping[str, Mapping[str, int]] | None = None) -> list[Problem]:
    """``n`` problems of ``task`` from ``split``; ``stream`` names an independent random stream;
    ``difficulty`` maps a task to its ``draw`` keywords (see :data:`DIFFICULTY`)."""
    family = _family(task)
    knobs = dict((difficulty or {}).get(task) or {})
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task}:{split}:{stream}:{seed}")
    want_heldout = split == "heldout"
    out: list[Problem] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        p = family.draw(rng, **knobs)
        if is_heldout(task, p.key) != want_heldout or (want_heldout and p.prompt in seen):
            misses += 1
            if misses > _MAX_FRUITLESS_DRAWS:
                raise HeldOutExhausted(task, len(out), n)
            continue
        misses = 0
        seen.add(p.prompt)
        out.append(p)
    return out


def task_rows(task: str, split: Literal["train", "heldout"], n: int, seed: int,
              difficulty: Mapping[str, Mapping[str, int]] | None = None) -> list[dict[str, Any]]:
    """``n`` RLVR rows in Ai2's schema: ``{"messages": [user], "ground_truth", "dataset"}``."""
    return [{"messages": [{"role": "user", "content": p.prompt}], "ground_truth": p.ground_truth,
             "dataset": VERIFIERS[task]} for p in problems(task, split, n, seed, difficulty=difficulty)]


def heldout_rows_up_to(task: str, n: int, seed: int,
                       difficulty: Mapping[str, Mapping[str, int]] | None = None) -> list[dict[str, Any]]:
    """``task_rows(task, "heldout", n, ...)``, or every distinct held-out prompt there is when the
    task's difficulty has fewer than ``n`` (the same draws, in the same order)."""
    try:
        return task_rows(task, "heldout", n, seed, difficulty)
    except HeldOutExhausted as e:
        return task_rows(task, "heldout", e.found, seed, difficulty)


def sft_rows(task: str, n: int, seed: int,
             difficulty: Mapping[str, Mapping[str, int]] | None = None, slip: float = 0.0) -> list[dict[str, Any]]:
    """``n`` chats from the training split: ``{"messages": [user, assistant]}``, every answer one
    the task's verifier accepts, except that each answer is, with probability ``slip``, a careless
    teacher's (``Problem.slip``: stops a step early, boxes the numerator alone, ignores the
    instruction), which the verifier rejects. Real SFT mixtures hold such answers; the preference
    and verified-reward stages are there to unlearn what imitation copied. The problems drawn do
    not depend on ``slip``."""
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip must be a probability 0..1, got {slip}")
    careless = random.Random(f"{task}:slip:{seed}")
    return [{"messages": [{"role": "user", "content": p.prompt},
                          {"role": "assistant", "content": p.slip if careless.random() < slip else p.answer}]}
            for p in problems(task, "train", n, seed, stream="sft", difficulty=difficulty)]


def _write_text(text: str, path: Path) -> Path:
    return write_text_atomic(path, text, mkdir=False)


def _readme(card: dict) -> str:
    lines = [
        "# Verifiable task data",
        "",
        f"Written by `python -m tulu.data.tasks` with seed {card['seed']}. The same arguments give "
        "byte-identical files.",
        f"About {card['heldout_per_mille'] / 10:g}% of problems are held out by a hash of the problem; "
        "held-out prompts never appear in `sft.jsonl` or `rlvr_train.jsonl`.",
        *([f"About {card['sft_slip']:.0%} of the answers in `sft.jsonl` are a careless teacher's, which the "
           "verifiers reject (a step short, the numerator alone boxed, the instruction ignored)."]
          if card.get("sft_slip") else []),
        "",
        "| task | verifier (`dataset`) | sft | rlvr_train | heldout |",
        "|---|---|---:|---:|---:|",
    ]
    for task, c in card["tasks"].items():
        lines.append(f"| {task} | {c['verifier']} | {c['sft']} | {c['rlvr_train']} | {c['heldout']} |")
    lines += ["", "| file | rows | sha256 |", "|---|---:|---|"]
    for f in card["files"].values():
        lines.append(f"| {f['path']} | {f['rows']} | `{f['sha256']}` |")
    return "\n".join(lines) + "\n"


def write_task_data(out_dir: str | Path, *, seed: int, train_per_task: int,
                    heldout_per_task: int | Mapping[str, int], sft_per_task: int, tasks: Sequence[str] = TASKS,
                    difficulty: Mapping[str, Mapping[str, int]] | None = None,
                    sft_slip: float = 0.0) -> dict[str, Path]:
    """Write ``sft.jsonl``, ``rlvr_train.jsonl`` and ``heldout.jsonl`` (``tasks`` mixed, shuffled
    by seed) and ``README.md``/``card.json`` describing them, each atomically; ``heldout_per_task``:
    one count for every task or a count per task; ``sft_slip``: see :func:`sft_rows`. Returns the
    paths by name (``sft``, ``rlvr_train``, ``heldout``, ``readme``, ``card``)."""
    tasks = tuple(tasks)
    if not 0.0 <= sft_slip <= 1.0:
        raise ValueError(f"sft_slip must be a probability 0..1, got {sft_slip}")
    for task in tasks:
        _family(task)
    if not tasks:
        raise ValueError(f"no tasks given; choose from {', '.join(TASKS)}")
    heldout = {t: heldout_per_task[t] if isinstance(heldout_per_task, Mapping) else heldout_per_task for t in tasks}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mixes: dict[str, list[dict[str, Any]]] = {
        "sft": [r for t in tasks for r in sft_rows(t, sft_per_task, seed, difficulty, sft_slip)],
        "rlvr_train": [r for t in tasks for r in task_rows(t, "train", train_per_task, seed, difficulty)],
        "heldout": [r for t in tasks for r in task_rows(t, "heldout", heldout[t], seed, difficulty)],
    }
    paths: dict[str, Path] = {}
    files: dict[str, dict[str, Any]] = {}
    for name, rows in mixes.items():
        random.Random(f"mix:{name}:{seed}").shuffle(rows)
        paths[name] = write_jsonl(rows, out / f"{name}.jsonl")
        files[name] = {"path": paths[name].name, "rows": len(rows),
                       "sha256": hashlib.sha256(paths[name].read_bytes()).hexdigest()}
    card = {
        "generator": "tulu.data.tasks",
        "seed": seed,
        "heldout_per_mille": HELDOUT_PER_MILLE,
        **({"sft_slip": sft_slip} if sft_slip else {}),
        "tasks": {t: {"verifier": VERIFIERS[t], "sft": sft_per_task, "rlvr_train": train_per_task,
                      "heldout": heldout[t], **({"difficulty": dict(difficulty[t])}
                                                      if (difficulty or {}).get(t) else {})} for t in tasks},
        "files": files,
    }
    paths["readme"] = _write_text(_readme(card), out / "README.md")
    paths["card"] = _write_text(json.dumps(card, indent=2) + "\n", out / "card.json")
    return paths
