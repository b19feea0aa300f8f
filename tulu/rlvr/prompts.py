"""The prompts of an RLVR run, in Ai2's RLVR schema (`messages`, `ground_truth`, `dataset`), and
which of them a step uses: a permutation seeded by (seed, epoch), so both roles, and a resumed
run, agree on a step's prompts without talking."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tulu.data.loader import epoch_order

EVAL_SEED_OFFSET = 7919


@dataclass(frozen=True, slots=True)
class Prompt:
    index: int
    token_ids: list[int]
    dataset: str
    ground_truth: object


class PromptSet:
    def __init__(self, rows: list[dict], tokenizer, seed: int, max_prompt_tokens: int):
        from tulu.data.chat import ChatFormat

        fmt = ChatFormat(tokenizer)
        self.prompts: list[Prompt] = []
        self.skipped = 0
        for i, row in enumerate(rows):
            messages = [m for m in row.get("messages", []) if m.get("role") != "assistant"]
            if not messages or "ground_truth" not in row or "dataset" not in row:
                self.skipped += 1
                continue
            ids = tokenizer(fmt.render(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt_tokens:
                self.skipped += 1
                continue
            self.prompts.append(Prompt(len(self.prompts), ids, row["dataset"], row["ground_truth"]))
        if not self.prompts:
            raise ValueError(f"no usable RLVR prompts ({self.skipped} rows skipped: missing messages, "
                             f"ground_truth or dataset, or longer than {max_prompt_tokens} tokens)")
        self.seed = seed
        self._epoch, self._epoch_order = None, None

    def __len__(self) -> int:
        return len(self.prompts)

    def for_step(self, step: int, count: int) -> list[Prompt]:
        out, n = [], len(self.prompts)
        for k in range(step * count, (step + 1) * count):
            epoch, pos = divmod(k, n)
            out.append(self.prompts[int(self._order(epoch)[pos])])
        return out

    def _order(self, epoch: int):
        """The epoch's permutation, kept while steps stay in that epoch (each step asks for it
        once per prompt: 0.1 ms per permutation of 4,096 prompts)."""
        if self._epoch != epoch:
            self._epoch, self._epoch_order = epoch, epoch_order(len(self.prompts), self.seed, epoch)
        return self._epoch_order


def read_rows(source: str | Path, split: str = "train", cache_dir: str | Path | None = None) -> list[dict]:
    """The rows of ``source``: a local jsonl file (read directly, it is the common case and fast),
    or anything :func:`tulu.data.source.load_source` reads - a parquet/json/csv file, a
    ``save_to_disk`` folder, a hub dataset name such as ``allenai/RLVR-MATH``."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from tulu.data.source import load_source

    return [dict(row) for row in load_source(str(source), split, cache_dir)]


def prompt_files(cfg) -> tuple[Path, Path | None]:
    """(train, held-out) jsonl: the configured files, or synthetic arithmetic written once
    (atomically, deterministic by seed, so every rank that races to write it writes the same)."""
    if cfg.data.train:  # a local path or a hub dataset name (read_rows tells them apart)
        return Path(cfg.data.train), Path(cfg.data.eval) if cfg.data.eval else None
    from tulu.data import make_synthetic

    if cfg.data.synthetic != "arithmetic_rlvr":
        from tulu.config.job import ConfigError

        raise ConfigError("data.synthetic", f"got {cfg.data.synthetic!r}; stage rlvr needs 'arithmetic_rlvr' "
                          "or data.train (a jsonl in Ai2's RLVR schema)")
    d, seed, n = cfg.run_dir / "data", cfg.data.shuffle_seed, cfg.data.synthetic_size
    train = d / f"rlvr-train-{n}-{seed}.jsonl"
    held_out = d / f"rlvr-eval-256-{seed + EVAL_SEED_OFFSET}.jsonl"
    if not train.exists():
        make_synthetic("rlvr", n, seed, train)
    if not held_out.exists():
        make_synthetic("rlvr", 256, seed + EVAL_SEED_OFFSET, held_out)
    return train, held_out
