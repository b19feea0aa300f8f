"""Data preparation before a training job: ``data.train`` tokenized by a job of its own.

`submit_job` is what `tulu submit` does: when the stage's data is not prepared yet, it submits
`prepare` as a one-task CPU job (``cluster.cpus_per_task`` tokenizer processes) and the training
job behind it with ``afterok`` (Slurm), or runs `prepare` here first (``cluster.executor:
local``). A hub dataset is fetched by that job too (its snapshot in the Hugging Face cache, which
every rank then reads offline). See `tulu.train.data` for the prepared folder.
"""

from __future__ import annotations

import contextlib
import os
import time

from tulu.config.job import JobConfig, config_from_dict
from tulu.launch import executor
from tulu.plan.layout import RankPlan
from tulu.train.data import prepare_stage_data, prepared_folder, prepared_summary


def preparation(cfg: JobConfig) -> tuple[str, object] | None:
    """("ready" | "needed" | "deferred", folder or reason) for a stage with data to prepare."""
    if cfg.stage not in ("sft", "dpo") or cfg.data.train is None:
        return None
    from tulu.train.model import tokenizer_name  # here: it imports torch, which `tulu submit` needs not

    name = tokenizer_name(cfg.model)
    if name is None:
        return "deferred", "the model's tokenizer is known once the earlier stage has a checkpoint"
    folder = prepared_folder(cfg, name)
    return ("ready" if prepared_summary(folder) is not None else "needed"), folder


def describe(cfg: JobConfig) -> str | None:
    """One line for `tulu plan`: where the stage's token rows come from."""
    found = preparation(cfg)
    if found is None:
        return None
    state, where = found
    if state == "ready":
        return f"data: {cfg.data.train} is prepared in {where}"
    if state == "needed":
        return (f"data: {cfg.data.train} gets tokenized by a preparation job before training "
                f"(1 task, {cfg.cluster.cpus_per_task} process(es)) into {where}")
    return f"data: {cfg.data.train}: training rank 0 tokenizes it ({where})"


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """``cluster.env`` as the job's tasks see it (e.g. HF_HUB_CACHE, HF_HUB_OFFLINE), undone after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare(cfg_dict: dict) -> dict:
    """The preparation job's task (also run in-process for the local executor)."""
    cfg = config_from_dict(cfg_dict)
    from tulu.train.model import tokenizer_name

    t0 = time.perf_counter()
    with _environment(cfg.cluster.env):
        summary = prepare_stage_data(cfg, tokenizer_name(cfg.model), num_proc=cfg.cluster.cpus_per_task)
    print(f"prepared {summary['rows']} rows of {cfg.data.train} ({time.perf_counter() - t0:.1f} s; "
          f"skipped {summary['skipped'] or 'none'})", flush=True)
    return summary


def submit_job(cfg: JobConfig, plan: RankPlan, config_path: str | None = None, after_ok: str | None = None):
    """Submit the training job, behind a preparation job when its data needs one; returns
    (training job, preparation job id or "here" or None)."""
    found = preparation(cfg)
    prep = None
    if found is not None and found[0] == "needed":
        paths = executor.run_paths(cfg)
        if cfg.cluster.executor == "local":
            prepare(cfg.to_dict())
            prep = "here"
        else:
            paths.logs.mkdir(parents=True, exist_ok=True)
            job = executor.submit_call(prepare, cfg.to_dict(), name=f"{cfg.run.name}-prepare",
                                       run_dir=paths.run_dir, cluster=cfg.cluster, after_ok=after_ok)
            prep = after_ok = str(job.job_id)
    return executor.submit(cfg, plan, config_path, after_ok=after_ok), prep
