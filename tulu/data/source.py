"""Where rows come from (a local file/folder or a hub name) and how they become token rows.

``load_source`` takes a path (``.jsonl``/``.json``/``.parquet`` file, a folder written by
``save_to_disk``, or a folder of data files) or a hub name such as
``allenai/tulu-3-sft-mixture``, and a split (slices like ``"train[:1000]"`` work).
``tokenize_rows`` maps a per-row function over it with ``datasets`` (cached under the caller's
``cache_dir``), counts rows the function rejects by reason, drops them with a warning, and returns
a :class:`TokenizedDataset`. On a cluster, run it once (rank 0, or one rank per node) before the
others so they hit the cache instead of tokenizing the same data at the same time.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tulu.data.chat import BadRow

if TYPE_CHECKING:
    import datasets


def _datasets():
    """`datasets` on first use: its import costs a second in every process that only reads
    JSON lines (an RLVR job's ranks)."""
    import datasets

    return datasets

log = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


@contextlib.contextmanager
def quiet_progress():
    """Silence datasets' progress bars inside the block (they flood Slurm logs)."""
    was_enabled = _datasets().is_progress_bar_enabled()
    _datasets().disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            _datasets().enable_progress_bars()


def load_source(source: str | Path, split: str = "train", cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Load raw rows from a local path or a hub dataset name."""
    cache = str(cache_dir) if cache_dir is not None else None
    path = Path(source)
    base_split = split.split("[", 1)[0]
    with quiet_progress():
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"data file {path}: unknown type {path.suffix!r}; "
                                 f"use one of {sorted(_BUILDERS)} or a save_to_disk folder")
            return _datasets().load_dataset(builder, data_files={base_split: str(path)}, split=split, cache_dir=cache)
        if path.is_dir():
            if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
                ds = _datasets().load_from_disk(str(path))
                if isinstance(ds, _datasets().DatasetDict):
                    if base_split not in ds:
                        raise ValueError(f"{path} has splits {sorted(ds)}, not {base_split!r}")
                    ds = ds[base_split]
                return ds
            return _datasets().load_dataset(str(path), split=split, cache_dir=cache)
        name = str(source)
        if name.count("/") != 1 or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"data source {name!r} is not an existing file or folder, "
                                    "nor a hub dataset name like 'allenai/tulu-3-sft-mixture'")
        return _datasets().load_dataset(str(hub_dataset_folder(name)), split=split, cache_dir=cache)


def hub_dataset_folder(name: str) -> Path:
    """The hub dataset ``name`` as a local folder: its snapshot in the Hugging Face cache.

    Reading the snapshot as a folder (not ``load_dataset(name)``) means the same files give the
    same rows with or without the network: a snapshot fetched once on a login node serves every
    rank with ``HF_HUB_OFFLINE=1``, where ``datasets`` alone would want the hub."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, repo_type="dataset"))


@dataclass
class TokenizedDataset:
    """Token rows ready for :class:`tulu.data.loader.BatchLoader`.

    ``kind == "sft"``: columns ``input_ids``, ``labels``, ``length``.
    ``kind == "preference"``: ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels``, ``length`` (the longer of the two).
    ``skipped`` counts the rows dropped, by reason (``too_long``, ``no_assistant_turn``, ...).
    """

    dataset: datasets.Dataset
    kind: str
    pad_token_id: int
    max_length: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)


class _RowMapper:
    """Batched map function: runs ``row_fn`` per row, turning :class:`BadRow` into a reason column."""

    def __init__(self, row_fn: Callable[[dict[str, Any]], dict[str, Any]], empty: dict[str, Any]):
        self.row_fn, self.empty = row_fn, empty

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values()))) if batch else 0
        out: dict[str, list] = {k: [] for k in [*self.empty, "bad_reason"]}
        for i in range(n):
            try:
                row, reason = self.row_fn({k: v[i] for k, v in batch.items()}), ""
            except BadRow as e:
                row, reason = self.empty, e.reason
            for k in self.empty:
                out[k].append(row[k])
            out["bad_reason"].append(reason)
        return out


def _is_good(reason: str) -> bool:
    return reason == ""


def tokenize_rows(raw: datasets.Dataset, row_fn: Callable[[dict[str, Any]], dict[str, Any]], *,
                  empty: dict[str, Any], kind: str, pad_token_id: int, max_length: int,
                  source: str, num_proc: int | None = None) -> TokenizedDataset:
    """Map ``row_fn`` over ``raw``; skip and count rejected rows; error if none are left."""
    with quiet_progress():
        mapped = raw.map(_RowMapper(row_fn, empty), batched=True, batch_size=256, num_proc=num_proc,
                         remove_columns=raw.column_names, desc=f"tokenizing {source}")
        skipped = dict(sorted(Counter(r for r in mapped["bad_reason"] if r).items()))
        good = mapped.filter(_is_good, input_columns="bad_reason", num_proc=num_proc) if skipped else mapped
        good = good.remove_columns("bad_reason")
    if skipped:
        log.warning("%s: skipped %d of %d rows (%s)", source, sum(skipped.values()), len(raw),
                    ", ".join(f"{k}={v}" for k, v in skipped.items()))
    if len(good) == 0:
        raise ValueError(f"{source}: every one of its {len(raw)} rows was skipped ({skipped}); "
                         "check the data's columns, the chat template and max_length")
    return TokenizedDataset(good, kind, pad_token_id, max_length, skipped)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id when it has no pad token (Llama 3)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)
