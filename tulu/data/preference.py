"""Preference pairs for DPO: ``chosen``/``rejected`` conversations -> two token rows per pair.

Rows as in ``allenai/llama-3.1-tulu-3-8b-preference-mixture``: ``chosen`` and ``rejected`` are
whole conversations ending in the assistant reply. Sets that give only the replies (a string or
assistant messages) with the question in ``prompt`` (a string or messages) are accepted too: the
prompt is put in front. Both sides are masked like SFT (every assistant turn by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tulu.data.chat import BadRow, ChatFormat
from tulu.data.source import TokenizedDataset, load_source, pad_id_of, tokenize_rows


def _conversation(side: Any, prompt: Any, name: str) -> Any:
    if side is None:
        raise BadRow("missing_chosen_or_rejected", name)
    if isinstance(side, str):
        side = [{"role": "assistant", "content": side}]
    only_replies = isinstance(side, list) and side and all(
        isinstance(m, dict) and m.get("role") == "assistant" for m in side)
    if only_replies and prompt is not None:
        prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        side = prompt_msgs + list(side)
    return side


class PreferenceRow:
    """One raw pair -> chosen/rejected ids and labels; raises ``BadRow`` for unusable pairs."""

    def __init__(self, chat: ChatFormat, max_length: int, last_turn_only: bool = False):
        self.chat, self.max_length, self.last_turn_only = chat, max_length, last_turn_only

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            msgs = _conversation(row.get(side), row.get("prompt"), side)
            tc = self.chat.tokenize(msgs, self.max_length, self.last_turn_only)
            if msgs[-1].get("role") != "assistant":
                raise BadRow("last_turn_not_assistant", side)
            out[f"{side}_input_ids"], out[f"{side}_labels"] = tc.input_ids, tc.labels
        out["length"] = max(len(out["chosen_input_ids"]), len(out["rejected_input_ids"]))
        return out


def load_preference_dataset(source: str | Path, tokenizer, *, max_length: int, split: str = "train",
                            cache_dir: str | Path | None = None, chat_template: str | None = None,
                            last_turn_only: bool = False, num_proc: int | None = None) -> TokenizedDataset:
    """Load and tokenize preference pairs; a pair is skipped if either side is unusable or too long."""
    raw = load_source(source, split, cache_dir)
    row = PreferenceRow(ChatFormat(tokenizer, chat_template), max_length, last_turn_only)
    empty = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [],
             "rejected_labels": [], "length": 0}
    return tokenize_rows(raw, row, empty=empty, kind="preference", pad_token_id=pad_id_of(tokenizer),
                         max_length=max_length, source=f"{source}:{split}", num_proc=num_proc)
