"""Batches of token rows: shuffled by (seed, epoch), sharded across data-parallel ranks, resumable.

An epoch is a list of *rows*: one sample per row when padding, several when packing (see
:mod:`tulu.data.packing`). Rows are ordered by a permutation seeded with ``(seed, epoch)``, so
every rank computes the same epoch without talking to the others. Step ``k`` of an epoch takes
rows ``[k·B·D, (k+1)·B·D)`` (``B`` = ``batch_size`` per rank, ``D`` = ``dp_size``), and rank
``r`` gets the ``r``-th block of ``B`` of them: ranks are disjoint and, together, read the whole
epoch except a last incomplete global batch, which is dropped so every rank runs the same number
of steps.

The position is a :class:`DataState` ``(epoch, index)``: ``index`` counts the rows the whole
data-parallel group has consumed in that epoch, so it is the same on every rank, can be saved
once in a checkpoint, and still means the same place if the run resumes with another ``dp_size``.

Each batch is a dict of tensors of shape ``[rows, max_length]``:
``tokens``, ``labels`` (-100 where no loss; same positions as tokens, the model shifts),
``loss_mask`` (bool, ``labels != -100``), ``attention_mask`` (1 on real tokens, 0 on padding),
``position_ids`` (restarting at each packed document) and ``document_ids`` (-1 on padding).
For preference data the ``2·B`` rows are the ``B`` chosen sequences followed by their ``B``
rejected partners (row ``i`` and row ``B + i`` are one pair), ready for one concatenated forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch

from tulu.data.chat import IGNORE_INDEX
from tulu.data.packing import plan_packs
from tulu.data.source import TokenizedDataset


@dataclass(frozen=True, slots=True)
class DataState:
    """Where the data stream stands: the next batch is at ``index`` rows into ``epoch``."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataState":
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order for one epoch: a permutation seeded by ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


class BatchLoader:
    """Iterate batches for one data-parallel rank, forever or for ``num_epochs``.

    ``loader.state`` is always the position of the next batch; save it with the checkpoint
    (``state_dict()``) and give it back (``load_state_dict`` or ``state=``) to continue exactly.
    """

    def __init__(self, data: TokenizedDataset, *, batch_size: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, pack: bool = False, shuffle: bool = True,
                 num_epochs: int | None = None, state: DataState | None = None):
        if batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= dp_rank < dp_size; got "
                             f"batch_size={batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        if pack and data.kind != "sft":
            raise ValueError(f"packing is for SFT data; {data.kind} data is padded (set pack=False)")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.dp_rank, self.dp_size, self.pack, self.shuffle = dp_rank, dp_size, pack, shuffle
        self.num_epochs = num_epochs
        self.seq_length = data.max_length
        self._lengths = np.asarray(data.dataset["length"], dtype=np.int64)
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.state = self._normalize(state or DataState())

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.dp_size

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, starts): row ``k`` of the epoch is ``order[starts[k]:starts[k + 1]]``."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            order = epoch_order(len(self._lengths), self.seed, epoch, self.shuffle)
            if self.pack:
                sizes = [len(p) for p in plan_packs(self._lengths[order], self.seq_length)]
                starts = np.concatenate([[0], np.cumsum(sizes)])
            else:
                starts = np.arange(len(order) + 1)
            self._plan_cache = (epoch, order, starts)
        return self._plan_cache[1], self._plan_cache[2]

    def num_rows(self, epoch: int) -> int:
        """Rows (samples, or packs when packing) in an epoch, before dropping the last partial batch."""
        return len(self._plan(epoch)[1]) - 1

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """All rows of an epoch, each a list of dataset indices (one index unless packing)."""
        order, starts = self._plan(epoch)
        return [order[starts[k]:starts[k + 1]].tolist() for k in range(len(starts) - 1)]

    def steps_in_epoch(self, epoch: int) -> int:
        return self.num_rows(epoch) // self.rows_per_step

    def total_steps(self, num_epochs: int) -> int:
        """Steps in epochs ``0..num_epochs-1`` (with packing the count can vary by epoch)."""
        return sum(self.steps_in_epoch(e) for e in range(num_epochs))

    def rows_at(self, state: DataState) -> list[list[int]]:
        """The dataset indices this rank reads in the batch at ``state`` (a normalized position)."""
        order, starts = self._plan(state.epoch)
        first = state.index + self.dp_rank * self.batch_size
        last = min(first + self.batch_size, len(starts) - 1)
        return [order[starts[k]:starts[k + 1]].tolist() for k in range(first, last)]

    def _normalize(self, state: DataState) -> DataState:
        """Move a position past the last full global batch of an epoch to the next epoch's start."""
        if state.epoch < 0 or state.index < 0:
            raise ValueError(f"invalid data position {state}")
        if self.steps_in_epoch(state.epoch) == 0:
            raise ValueError(f"epoch {state.epoch} has {self.num_rows(state.epoch)} rows, fewer "
                             f"than one global batch (batch_size {self.batch_size} x dp_size "
                             f"{self.dp_size}); use a smaller batch or more data")
        if state.index + self.rows_per_step > self.num_rows(state.epoch):
            return self._normalize(DataState(state.epoch + 1, 0))
        return state

    # -- checkpoint protocol (torch.distributed.checkpoint's Stateful) ---------------------------
    def state_dict(self) -> dict[str, int]:
        return self.state.to_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = self._normalize(DataState.from_dict(d))

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.num_epochs is None or self.state.epoch < self.num_epochs:
            batch = self.batch_at(self.state)
            self.state = self._normalize(DataState(self.state.epoch, self.state.index + self.rows_per_step))
            yield batch

    def batch_at(self, state: DataState) -> dict[str, torch.Tensor]:
        """Build this rank's batch at a position without moving the loader."""
        rows = self.rows_at(state)
        flat = [i for row in rows for i in row]
        ds = self.data.dataset
        if self.data.kind == "preference":
            cols = ds.select_columns(["chosen_input_ids", "chosen_labels",
                                      "rejected_input_ids", "rejected_labels"])[flat]
            docs = [(ids, lab) for ids, lab in zip(cols["chosen_input_ids"], cols["chosen_labels"])]
            docs += [(ids, lab) for ids, lab in zip(cols["rejected_input_ids"], cols["rejected_labels"])]
            layout = [[k] for k in range(len(docs))]
        else:
            cols = ds.select_columns(["input_ids", "labels"])[flat]
            docs = list(zip(cols["input_ids"], cols["labels"]))
            layout, k = [], 0
            for row in rows:
                layout.append(list(range(k, k + len(row))))
                k += len(row)
        return self._collate(docs, layout)

    def _collate(self, docs: list[tuple[list[int], list[int]]],
                 layout: list[list[int]]) -> dict[str, torch.Tensor]:
        """Lay documents into fixed-length rows: ``layout[r]`` lists the documents of row ``r``."""
        n_rows, length = len(layout), self.seq_length
        tokens = np.full((n_rows, length), self.data.pad_token_id, dtype=np.int64)
        labels = np.full((n_rows, length), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((n_rows, length), dtype=np.int64)
        document_ids = np.full((n_rows, length), -1, dtype=np.int64)
        for r, doc_indices in enumerate(layout):
            offset = 0
            for d, k in enumerate(doc_indices):
                ids, lab = docs[k]
                n = len(ids)
                tokens[r, offset:offset + n] = ids
                labels[r, offset:offset + n] = lab
                position_ids[r, offset:offset + n] = np.arange(n)
                document_ids[r, offset:offset + n] = d
                offset += n
        t = {"tokens": tokens, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}
        out = {k: torch.from_numpy(v) for k, v in t.items()}
        out["loss_mask"] = out["labels"] != IGNORE_INDEX
        out["attention_mask"] = (out["document_ids"] >= 0).long()
        return out
