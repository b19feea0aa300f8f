"""Training and held-out data for a stage: tokenizer, synthetic files, tokenized datasets.

Data named by ``data.train`` (a hub dataset or a file) is tokenized once, before the training
ranks start: `tulu submit` runs `prepare_stage_data` as a job of its own (one task, one process
per ``cluster.cpus_per_task``; the training job waits for it with ``afterok``), which writes the
token rows to a *prepared folder* (`prepared_folder`) and ``ready.json`` last. Every training
rank then reads that folder (memory-mapped Arrow), so no rank tokenizes a whole mixture while
the others wait at a barrier under a collective time-out. Without a prepared folder (a job
submitted by other means, synthetic data) global rank 0 of the training group tokenizes first
(filling the ``datasets`` cache) and the others wait at a barrier, then read the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tulu.atomic import write_json_atomic
from tulu.config.job import ConfigError

log = logging.getLogger("tulu.train.data")
READY = "ready.json"

SYNTHETIC_FOR_STAGE = {"sft": ("arithmetic_sft", "sft"), "dpo": ("arithmetic_preference", "preference")}
EVAL_SEED_OFFSET = 7919  # the held-out split is drawn with another seed


@dataclass
class StageData:
    tokenizer: Any
    train: Any  # TokenizedDataset
    eval: Any | None


def build_tokenizer(name: str):
    """``"tiny"``: the project's byte-level tokenizer; otherwise a HF tokenizer name or path."""
    from tulu.train.model import TINY_TOKENIZER

    if name == TINY_TOKENIZER:
        from tulu.data import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def synthetic_sources(cfg, eval_size: int) -> tuple[Path, Path]:
    """(train, eval) jsonl paths of the stage's synthetic data under ``<run_dir>/data``."""
    from tulu.data import make_synthetic

    wanted, kind = SYNTHETIC_FOR_STAGE[cfg.stage]
    if cfg.data.synthetic != wanted:
        raise ConfigError("data.synthetic", f"got {cfg.data.synthetic!r}; stage {cfg.stage} trains on "
                          f"{wanted!r} (or give data.train)")
    d, seed, n = cfg.run_dir / "data", cfg.data.shuffle_seed, cfg.data.synthetic_size
    train = d / f"{wanted}-train-{n}-{seed}.jsonl"
    held_out = d / f"{wanted}-eval-{eval_size}-{seed + EVAL_SEED_OFFSET}.jsonl"
    if not train.exists():
        make_synthetic(kind, n, seed, train)
    if not held_out.exists():
        make_synthetic(kind, eval_size, seed + EVAL_SEED_OFFSET, held_out)
    return train, held_out


def _cache(cfg) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else cfg.run_dir / "cache"


def _tokenize(cfg, tokenizer, train_src, eval_src, num_proc: int | None = None):
    from tulu.data import load_preference_dataset, load_sft_dataset

    load = load_sft_dataset if cfg.stage == "sft" else load_preference_dataset
    n, cache = cfg.stage_config.max_seq_len, _cache(cfg)
    train = load(train_src, tokenizer, max_length=n, split=cfg.data.split, cache_dir=cache, num_proc=num_proc)
    held_out = load(eval_src, tokenizer, max_length=n, split="train", cache_dir=cache, num_proc=num_proc) \
        if eval_src is not None else None
    return train, held_out


def preparation_key(cfg, tokenizer_name: str) -> dict:
    """Everything the token rows depend on: another value is another prepared folder."""
    return {"stage_kind": "sft" if cfg.stage == "sft" else "preference", "train": cfg.data.train,
            "eval": cfg.data.eval, "split": cfg.data.split, "tokenizer": tokenizer_name,
            "max_seq_len": cfg.stage_config.max_seq_len}


def prepared_folder(cfg, tokenizer_name: str) -> Path | None:
    """Where `prepare_stage_data` puts this stage's token rows; None when the stage has nothing
    to prepare (synthetic data, or RLVR, whose leader reads prompts only)."""
    if cfg.stage not in ("sft", "dpo") or cfg.data.train is None:
        return None
    key = json.dumps(preparation_key(cfg, tokenizer_name), sort_keys=True)
    return _cache(cfg) / "prepared" / f"{cfg.stage}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def prepared_summary(folder: Path | None) -> dict | None:
    """The folder's ``ready.json`` when it is complete, else None."""
    try:
        return json.loads((folder / READY).read_text()) if folder is not None else None
    except (OSError, ValueError):
        return None


def prepare_stage_data(cfg, tokenizer_name: str, num_proc: int | None = None) -> dict:
    """Tokenize ``data.train`` (and ``data.eval``) into the prepared folder; returns its summary.
    Written beside the folder and renamed into place, ``ready.json`` last: a crash leaves no
    half folder that a training rank would read, and a second preparation of the same key finds
    the first one's folder and stops."""
    folder = prepared_folder(cfg, tokenizer_name)
    if folder is None:
        raise ConfigError("data.train", f"stage {cfg.stage} with data.train {cfg.data.train!r} has nothing to prepare")
    done = prepared_summary(folder)
    if done is not None:
        return done
    from tulu.data.source import quiet_progress

    tokenizer = build_tokenizer(tokenizer_name)
    train, held_out = _tokenize(cfg, tokenizer, cfg.data.train, cfg.data.eval,
                                num_proc if num_proc and num_proc > 1 else None)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_progress():
        train.dataset.save_to_disk(str(tmp / "train"))
        if held_out is not None:
            held_out.dataset.save_to_disk(str(tmp / "eval"))
    summary = {**preparation_key(cfg, tokenizer_name), "kind": train.kind, "pad_token_id": train.pad_token_id,
               "rows": len(train), "eval_rows": len(held_out) if held_out is not None else None,
               "skipped": train.skipped, "eval_skipped": held_out.skipped if held_out is not None else None}
    write_json_atomic(tmp / READY, summary)
    try:
        os.rename(tmp, folder)
    except OSError:  # prepared meanwhile by another job (same key): keep the one in place
        shutil.rmtree(tmp, ignore_errors=True)
        if prepared_summary(folder) is None:
            raise
    return prepared_summary(folder)


def _read_prepared(folder: Path, summary: dict, tokenizer) -> StageData:
    from datasets import load_from_disk

    from tulu.data.source import TokenizedDataset

    def part(name: str, skipped) -> TokenizedDataset:
        return TokenizedDataset(load_from_disk(str(folder / name)), summary["kind"], summary["pad_token_id"],
                                summary["max_seq_len"], dict(skipped or {}))

    held_out = part("eval", summary["eval_skipped"]) if summary["eval_rows"] is not None else None
    return StageData(tokenizer, part("train", summary["skipped"]), held_out)


def load_stage_data(cfg, tokenizer_name: str, *, is_leader: bool, barrier: Callable[[], None],
                    eval_size: int) -> StageData:
    tokenizer = build_tokenizer(tokenizer_name)
    folder = prepared_folder(cfg, tokenizer_name)
    summary = prepared_summary(folder)
    if summary is not None:  # every rank reads the prepared rows; nobody waits on a tokenizer
        return _read_prepared(folder, summary, tokenizer)
    if folder is not None and is_leader:
        log.warning("%s is not prepared (no %s): training rank 0 tokenizes it now while the others wait; "
                    "`tulu submit` prepares it in a job of its own first", cfg.data.train, folder / READY)

    def read() -> StageData:
        if cfg.data.train is None and cfg.data.synthetic is None:
            raise ConfigError("data.train", "no training data: give data.train (a file or hub name) "
                              "or data.synthetic")
        if cfg.data.train is not None:
            train_src, eval_src = cfg.data.train, cfg.data.eval
        else:
            train_src, eval_src = synthetic_sources(cfg, eval_size)
        return StageData(tokenizer, *_tokenize(cfg, tokenizer, train_src, eval_src))

    if is_leader:
        try:
            data = read()
        finally:  # never leave the other ranks waiting
            barrier()
    else:
        barrier()
        data = read()
    return data
