"""The shared-prompt sequence layout: a prompt's ``group`` samples as one sequence,

    [pad.. prompt | response 0 | response 1 | ... | response group-1 | pad..]   (length S)

the responses back to back, each attending to the prompt and to its own earlier tokens only,
and RoPE positions restarting after the prompt for every response. The prompt runs through the
model once per group instead of once per sample, and no response is padded to the longest one:
the sequence is ``W + sum of its responses`` long (``S`` is the longest such sum in the
batch, or a length the caller fixes). Every response's log-probs are the one-row-per-sample
layout's (up to float rounding). Used by the learner's passes (`tulu.rlvr.batch`) and by the
transformers engine's reference log-probs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["SharedPromptLayout"]


@dataclass(frozen=True)
class SharedPromptLayout:
    width: int  # W: the longest prompt (shorter ones are left-padded)
    response_lengths: tuple[tuple[int, ...], ...]  # per sequence, its responses' lengths, in order
    length: int  # S
    response_width: int  # R: the per-token tensors' columns, at least the longest response

    @classmethod
    def of(cls, width: int, response_lengths: Sequence[Sequence[int]], length: int | None = None,
           response_width: int | None = None) -> "SharedPromptLayout":
        """The layout of sequences whose responses have ``response_lengths``. ``length``: a fixed
        S (pipeline parallelism sends fixed-size activations), ``response_width``: a fixed R (the
        batch's longest response), each at least what these sequences need."""
        lengths = tuple(tuple(int(n) for n in r) for r in response_lengths)
        if not lengths or len({len(r) for r in lengths}) != 1:
            raise ValueError("a shared-prompt layout needs at least one sequence and the same group size in each")
        need, longest = width + max(sum(r) for r in lengths), max(1, max(max(r) for r in lengths))
        if length is not None and length < need:
            raise ValueError(f"a shared-prompt length of {length} is shorter than the longest sequence ({need})")
        if response_width is not None and response_width < longest:
            raise ValueError(f"a response width of {response_width} is shorter than the longest response ({longest})")
        return cls(width, lengths, need if length is None else length,
                   longest if response_width is None else response_width)

    @property
    def sequences(self) -> int:
        return len(self.response_lengths)

    @property
    def group(self) -> int:
        return len(self.response_lengths[0])

    @functools.cached_property
    def _lengths(self) -> torch.Tensor:
        """[B, group]: ``response_lengths`` as a tensor (the layout is frozen: made once, read only)."""
        return torch.tensor(self.response_lengths, dtype=torch.long)

    def starts(self) -> torch.Tensor:
        """[B, group]: the position of each response's first token."""
        return self.width + self._lengths.cumsum(dim=1) - self._lengths

    @functools.cached_property
    def _response_of(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, S] which response each position holds, or ``group`` past the last; [B, S] the
        position's offset after the prompt); read only, shared by :meth:`segments` and
        :meth:`rope_positions`."""
        offset = (torch.arange(self.length) - self.width).expand(self.sequences, -1).contiguous()
        return torch.searchsorted(self._lengths.cumsum(dim=1), offset, right=True), offset

    def segments(self) -> torch.Tensor:
        """[B, S]: -1 on the prompt's columns, j on response j's tokens, -2 on the tail padding."""
        j, offset = self._response_of
        return torch.where(offset < 0, -1, torch.where(j < self.group, j, -2))

    def allowed(self, valid: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] bool attention (True = attend) for sequences whose real tokens are
        ``valid`` [B, S]; a pad query sees itself only (SDPA gives NaN for a row without keys)."""
        S = self.length
        seg = self.segments()
        q, k = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(S, S, dtype=torch.bool).tril()[None]
        structure = ((k == -1) & ((q != -1) | causal)) | ((q == k) & (q >= 0) & causal)
        eye = torch.eye(S, dtype=torch.bool)[None]
        return ((structure & valid[:, None, :]) | eye)[:, None]

    def rope_positions(self) -> torch.Tensor:
        """[B, S]: the prompt at 0..W-1, every response at W, W + 1, ... (left padding shifts a whole
        sequence, and RoPE sees only differences); the tail padding at W."""
        W = self.width
        j, offset = self._response_of
        inside = (offset >= 0) & (j < self.group)
        start = (self.starts() - W).gather(1, j.clamp(max=self.group - 1))  # each position's response's start
        return torch.where(offset < 0, offset + W, torch.where(inside, W + offset - start, W))

    def logits_at(self) -> torch.Tensor:
        """[B, group * R]: the sequence position whose logits predict response token t of sample j
        (column j * R + t): the prompt's last position for t = 0, else the token before; columns
        past a response's end point at the prompt's last position (their targets are masked)."""
        W, R = self.width, self.response_width
        t = torch.arange(R)
        at = self.starts()[:, :, None] + t - 1  # [B, G, R]
        at = torch.where((t == 0) | (t >= self._lengths[:, :, None]), W - 1, at)
        return at.reshape(self.sequences, -1)

    def place(self, tokens: torch.Tensor, valid: torch.Tensor, k: int, prompt, responses) -> None:
        """Write sequence ``k``: ``prompt`` (ids) and its ``group`` ``responses`` (ids), whose
        lengths are the layout's ``response_lengths[k]``."""
        W = self.width
        if [len(r) for r in responses] != list(self.response_lengths[k]):
            raise ValueError(f"sequence {k}: responses of lengths {[len(r) for r in responses]}, the layout has "
                             f"{list(self.response_lengths[k])}")
        p = len(prompt)
        tokens[k, W - p:W] = torch.as_tensor(prompt, dtype=torch.long)
        valid[k, W - p:W] = True
        start = W
        for resp in responses:
            n = len(resp)
            tokens[k, start:start + n] = torch.as_tensor(resp, dtype=torch.long)
            valid[k, start:start + n] = True
            start += n
