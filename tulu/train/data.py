"""Training and held-out data for a stage: tokenizer, synthetic files, tokenized datasets.

Global rank 0 of the training group writes synthetic data and tokenizes first (filling the
``datasets`` cache); the others wait at a barrier and then read the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tulu.config.job import ConfigError

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


def load_stage_data(cfg, tokenizer_name: str, *, is_leader: bool, barrier: Callable[[], None],
                    eval_size: int) -> StageData:
    from tulu.data import load_preference_dataset, load_sft_dataset

    st = cfg.stage_config
    tokenizer = build_tokenizer(tokenizer_name)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else cfg.run_dir / "cache"
    load = load_sft_dataset if cfg.stage == "sft" else load_preference_dataset

    def read() -> StageData:
        if cfg.data.train is None and cfg.data.synthetic is None:
            raise ConfigError("data.train", "no training data: give data.train (a file or hub name) "
                              "or data.synthetic")
        if cfg.data.train is not None:
            train_src, eval_src = cfg.data.train, cfg.data.eval
        else:
            train_src, eval_src = synthetic_sources(cfg, eval_size)
        train = load(train_src, tokenizer, max_length=st.max_seq_len, split=cfg.data.split, cache_dir=cache)
        held_out = load(eval_src, tokenizer, max_length=st.max_seq_len, split="train", cache_dir=cache) \
            if eval_src is not None else None
        return StageData(tokenizer, train, held_out)

    if is_leader:
        try:
            data = read()
        finally:  # never leave the other ranks waiting
            barrier()
    else:
        barrier()
        data = read()
    return data
