"""SFT data: chat rows (``messages``: list of {role, content}) -> token ids and assistant-only labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tulu.data.chat import ChatFormat
from tulu.data.source import TokenizedDataset, load_source, pad_id_of, tokenize_rows


class SFTRow:
    """One raw row -> ``input_ids``, ``labels``, ``length``; raises ``BadRow`` for unusable rows."""

    def __init__(self, chat: ChatFormat, max_length: int, messages_key: str = "messages",
                 last_turn_only: bool = False):
        self.chat, self.max_length = chat, max_length
        self.messages_key, self.last_turn_only = messages_key, last_turn_only

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        tc = self.chat.tokenize(row.get(self.messages_key), self.max_length, self.last_turn_only)
        return {"input_ids": tc.input_ids, "labels": tc.labels, "length": len(tc.input_ids)}


def load_sft_dataset(source: str | Path, tokenizer, *, max_length: int, split: str = "train",
                     cache_dir: str | Path | None = None, chat_template: str | None = None,
                     messages_key: str = "messages", last_turn_only: bool = False,
                     num_proc: int | None = None) -> TokenizedDataset:
    """Load and tokenize an SFT set (a path or a hub name such as ``allenai/tulu-3-sft-mixture``).

    Rows longer than ``max_length`` tokens are skipped (counted as ``too_long``), not truncated.
    """
    raw = load_source(source, split, cache_dir)
    row = SFTRow(ChatFormat(tokenizer, chat_template), max_length, messages_key, last_turn_only)
    return tokenize_rows(raw, row, empty={"input_ids": [], "labels": [], "length": 0}, kind="sft",
                         pad_token_id=pad_id_of(tokenizer), max_length=max_length,
                         source=f"{source}:{split}", num_proc=num_proc)
