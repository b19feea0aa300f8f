"""The pipeline's steps that are not training stages, each a plain function a one-task job runs:
the task data (on the submitting machine), on-policy DPO pairs from the SFT model, and the final
evaluation (every stage's checkpoint on the held-out prompts, a table and a plot).

Every output is written atomically, so a requeued or repeated step starts clean.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tulu.atomic import write_json_atomic
from tulu.pipeline.config import UNTRAINED


def write_data(data_dir: Path, settings) -> dict[str, Path]:
    """The task files (same seed and sizes -> the same bytes); kept when the card matches."""
    from tulu.data.tasks import HeldOutExhausted, write_task_data

    t = settings.tasks
    card = data_dir / "card.json"
    wanted = {"seed": settings.seed, "names": list(t.names), "sft_per_task": t.sft_per_task,
              "train_per_task": t.train_per_task, "heldout_per_task": t.heldout_per_task,
              "difficulty": t.difficulty(), **({"sft_slip": t.sft_slip} if t.sft_slip else {})}
    names = {"sft": "sft.jsonl", "rlvr_train": "rlvr_train.jsonl", "heldout": "heldout.jsonl"}
    if card.exists() and json.loads(card.read_text()).get("pipeline") == wanted and \
            all((data_dir / f).exists() for f in names.values()):
        return {k: data_dir / f for k, f in names.items()}
    try:
        paths = write_task_data(data_dir, seed=settings.seed, train_per_task=t.train_per_task,
                                heldout_per_task=t.heldout_counts(), sft_per_task=t.sft_per_task,
                                tasks=list(t.names), difficulty=t.difficulty(), sft_slip=t.sft_slip)
    except HeldOutExhausted as e:
        raise _heldout_error(t, e) from e
    info = json.loads(card.read_text()) if card.exists() else {}
    info["pipeline"] = wanted
    _write_json(card, info)
    return {k: Path(v) for k, v in paths.items()}


def check_heldout(settings) -> None:
    """Refuse, by its key, a held-out count above the distinct prompts a task has at its
    difficulty, as `write_data` would, writing nothing (`tulu pipeline --dry-run`)."""
    from tulu.data.tasks import HeldOutExhausted, task_rows

    t = settings.tasks
    for task, n in t.heldout_counts().items():
        try:
            task_rows(task, "heldout", n, settings.seed, t.difficulty())
        except HeldOutExhausted as e:
            raise _heldout_error(t, e) from e


def _heldout_error(t, e):
    from tulu.config.schema import ConfigError

    per_task = isinstance(t.heldout_per_task, dict)
    return ConfigError("pipeline.tasks.heldout_per_task" + (f".{e.task}" if per_task else ""),
                       f"got {e.asked}; only {e.found} distinct held-out {e.task} prompts exist at this "
                       f"difficulty ({t.difficulty().get(e.task, {}) or 'the default'}): ask for at most "
                       f"{e.found}, or make the {e.task} task larger")


def export_stage(stage_dir: Path) -> Path:
    """The stage's newest verified checkpoint as a HF folder ``<stage_dir>/hf`` (replaced whole:
    written next to it, then renamed into place)."""
    from tulu.export import export

    return export(stage_dir / "checkpoints", stage_dir / "hf", force=True)


def pairs_step(pipeline_dir: str, settings: dict) -> dict:
    """Sample the SFT model on training prompts, label by verifier, write ``data/dpo_pairs.jsonl``."""
    from tulu.pipeline.config import TasksConfig
    from tulu.pipeline.pairs import make_onpolicy_pairs

    root = Path(pipeline_dir)
    p, seed = settings["pairs"], settings["seed"]
    model = export_stage(root / "sft")
    t = TasksConfig(**settings["tasks"])
    prompts = _pair_prompts(root / "data", t.names, p["prompts_per_task"], seed, t.difficulty())
    stats = make_onpolicy_pairs(model, prompts, root / "data" / "dpo_pairs.jsonl",
                                samples_per_prompt=p["samples_per_prompt"], temperature=p["temperature"],
                                max_new_tokens=p["max_new_tokens"], seed=seed, engine=p["engine"],
                                fallback_chosen="ground_truth_sft" if p["reference_chosen"] else None)
    _write_json(root / "pairs" / "stats.json", stats)
    print(json.dumps({"pairs": stats}), flush=True)
    if not stats.get("pairs"):
        raise RuntimeError("no DPO pairs: every sample of the SFT model was verified, or none was and "
                           "pipeline.pairs.reference_chosen is off; see pairs/stats.json")
    return stats


def _pair_prompts(data_dir: Path, tasks: list[str], per_task: int, seed: int,
                  difficulty: dict | None = None) -> Path:
    """Training-split prompts of each task (a stream of their own) with the task's reference
    answer, which is "chosen" where the SFT model never gets a prompt right."""
    from tulu.data.synthetic import write_jsonl
    from tulu.data.tasks import VERIFIERS, problems

    rows = [{"messages": [{"role": "user", "content": p.prompt}], "ground_truth": p.ground_truth,
             "dataset": VERIFIERS[task], "reference": p.answer}
            for task in tasks for p in problems(task, "train", per_task, seed, stream="pairs", difficulty=difficulty)]
    return write_jsonl(rows, data_dir / "pair_prompts.jsonl")


def untrained_dir(pipeline_dir: str | Path) -> Path:
    """Where the evaluation writes the untrained model (:func:`untrained_model`) as an HF folder."""
    return Path(pipeline_dir) / "eval" / f"{UNTRAINED}-hf"


def untrained_model(like: Path, out: Path, seed: int) -> Path:
    """A randomly initialised model of ``like``'s shape (its ``config.json``), seeded, with
    ``like``'s tokenizer files, as an HF folder ``out``: what SFT starts from (SFT draws its own
    initial weights alike, through Megatron), so the report shows what SFT adds."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    model.save_pretrained(out)  # the same files every time, so a repeated evaluation overwrites them
    for f in like.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


def evaluate_step(pipeline_dir: str, settings: dict, stages: list[str]) -> dict:
    """Every stage's model on the held-out prompts (with an SFT stage, an untrained model of its
    shape first): accuracy per stage and task, a table, a plot."""
    from tulu.pipeline.plot import plot_pipeline
    from tulu.pipeline.report import accuracy_table, evaluate_model, write_report

    root = Path(pipeline_dir)
    e = settings["eval"]
    out = root / "eval"
    results = {}

    def score(name: str, model: Path, t0: float) -> None:
        results[name] = evaluate_model(model, root / "data" / "heldout.jsonl", max_new_tokens=e["max_new_tokens"],
                                       engine=e["engine"], samples_out=out / f"samples-{name}.jsonl")
        results[name]["eval_s"] = round(time.time() - t0, 1)
        print(f"{name}: held-out accuracy {results[name]['accuracy']:.3f} (n={results[name]['n']})", flush=True)

    for stage in stages:
        t0 = time.time()
        model = export_stage(root / stage)
        if stage == "sft":  # SFT starts from a random initialisation: the row its gain is measured from
            t1 = time.time()
            score(UNTRAINED, untrained_model(model, untrained_dir(root), settings["seed"]), t1)
            t0 += time.time() - t1  # SFT's time is its export and its evaluation, not the untrained row's
        score(stage, model, t0)
    png = plot_pipeline({s: root / s for s in stages}, results, out / "curves.png")
    write_report(out, results, curves_png=png)
    print(accuracy_table(results), flush=True)
    return results


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj)
