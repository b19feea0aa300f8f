"""The shared-prompt sequence layout: a prompt's ``group`` samples as one sequence,

    [pad.. prompt | response 0 + pad | response 1 + pad | ... ]   (length W + group * R)

with each response attending to the prompt and to its own earlier tokens only, and RoPE
positions restarting after the prompt for every response. The prompt runs through the model
once per group instead of once per sample; every response's log-probs are the one-row-per-sample
layout's (up to float rounding). Used by the learner's passes (`tulu.rlvr.batch`) and by the
transformers engine's reference log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SharedPromptLayout"]


@dataclass(frozen=True)
class SharedPromptLayout:
    width: int  # W: the longest prompt (shorter ones are left-padded)
    response_width: int  # R: the longest response (shorter ones are right-padded)
    group: int

    @property
    def length(self) -> int:
        return self.width + self.group * self.response_width

    def structure(self) -> torch.Tensor:
        """[S, S] bool, True where query i may attend to key j (before padding is masked)."""
        W, R, G, S = self.width, self.response_width, self.group, self.length
        seg = torch.cat([torch.full((W,), -1), torch.arange(G).repeat_interleave(R)])
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        to_prompt = (seg[None, :] == -1) & ((seg[:, None] != -1) | causal)
        return to_prompt | ((seg[:, None] == seg[None, :]) & causal)

    def allowed(self, valid: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] bool attention (True = attend) for sequences whose real tokens are
        ``valid`` [B, S]; a pad query sees itself only (SDPA gives NaN for a row without keys)."""
        eye = torch.eye(self.length, dtype=torch.bool)
        return ((self.structure()[None] & valid[:, None, :]) | eye[None])[:, None]

    def rope_positions(self) -> torch.Tensor:
        """[S]: the prompt at 0..W-1, every response at W, W + 1, ... (left padding shifts a whole
        sequence, and RoPE sees only differences)."""
        W, R = self.width, self.response_width
        return torch.cat([torch.arange(W), W + torch.arange(R).repeat(self.group)])

    def logits_at(self) -> torch.Tensor:
        """[group * R]: the sequence position whose logits predict response token t of sample j
        (index j * R + t): the prompt's last position for t = 0, else the token before."""
        W, R = self.width, self.response_width
        t = torch.arange(R)
        return torch.where(t == 0, W - 1, W + torch.arange(self.group)[:, None] * R + t - 1).reshape(-1)

    def place(self, tokens: torch.Tensor, valid: torch.Tensor, k: int, prompt, responses) -> None:
        """Write sequence ``k``: ``prompt`` (ids) and its ``group`` ``responses`` (ids)."""
        W, R = self.width, self.response_width
        p = len(prompt)
        tokens[k, W - p:W] = torch.as_tensor(prompt, dtype=torch.long)
        valid[k, W - p:W] = True
        for j, resp in enumerate(responses):
            n = len(resp)
            tokens[k, W + j * R:W + j * R + n] = torch.as_tensor(resp, dtype=torch.long)
            valid[k, W + j * R:W + j * R + n] = True
