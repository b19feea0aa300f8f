"""What SFT and DPO compute per micro-batch, and how their sums become reported metrics.

An objective splits a rank's batch into micro-batches (``split``), adds what the loss needs
beyond the batch (``prepare``: DPO's reference log-probs), computes the loss of one micro-batch
on the last pipeline stage (``loss_fn``: ``(loss sum, loss units, metric sums)``) and turns the
global sums into metrics (``metrics``). ``evaluate`` runs forward-only over held-out batches.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tulu.train import batches, losses
from tulu.train.step import device, forward_only, reduce_sums


class SFTObjective:
    """Masked next-token cross entropy, averaged over every response token of the global batch."""

    data_kind = "sft"
    keys = ("loss", "tokens")

    def __init__(self, stage_cfg, seq_length: int, num_micro: int):
        self.seq_length, self.num_micro, self.packed = seq_length, num_micro, stage_cfg.packing

    def split(self, batch: dict) -> list[dict]:
        return [batches.to_device(mb, device()) for mb in batches.split_sft(batch, self.num_micro, self.packed)]

    def prepare(self, microbatches: list[dict], pair_indices=None) -> None:
        return None

    def loss_fn(self, mb: dict, output: torch.Tensor):
        loss_sum, n = losses.masked_token_loss_sum(output.float(), mb["loss_mask"])
        return loss_sum, n, {"loss": loss_sum.detach(), "tokens": n.float()}

    @staticmethod
    def metrics(sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(sums["tokens"], 1.0)}

    def evaluate(self, policy, eval_batches: Sequence[list[dict]]) -> dict[str, float]:
        sums = dict.fromkeys(self.keys, 0.0)
        for mbs in eval_batches:
            for k, v in reduce_sums(forward_only(policy.ddp, mbs, self.loss_fn, seq_length=self.seq_length),
                                    self.keys).items():
                sums[k] += v
        return {"loss": sums["loss"] / max(sums["tokens"], 1.0), "tokens": sums["tokens"]}


class DPOObjective:
    """DPO against a frozen reference (length-normalised ``dpo_norm`` by default, as in Tülu 3).

    Reference log-probs come from a forward-only pipeline pass of the reference model over the
    same micro-batches (``reference_logprobs: frozen_model``), or from a table computed before
    training for every pair the rank will see, after which the reference is freed
    (``precomputed``). They are needed on the last pipeline stage only, where the loss is.
    """

    data_kind = "preference"
    keys = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "logp_accuracy", "chosen_nll", "pairs")

    def __init__(self, stage_cfg, seq_length: int, num_micro: int, reference):
        self.beta, self.nll_coef = stage_cfg.beta, stage_cfg.nll_coef
        self.normalize = stage_cfg.loss == "dpo_norm"
        self.seq_length, self.num_micro = seq_length, num_micro
        self.reference = reference
        self.table: dict[int, torch.Tensor] | None = None  # precomputed: dataset index -> (ref_c, ref_r)

    def split(self, batch: dict) -> list[dict]:
        return [batches.to_device(mb, device()) for mb in batches.split_pairs(batch, self.num_micro)]

    # -- reference log-probs ----------------------------------------------------------------------
    def _ref_loss_fn(self, mb: dict, output: torch.Tensor):
        logps = losses.sequence_logps(-output.float(), mb["loss_mask"], self.normalize)
        return output.sum() * 0.0, torch.tensor(1, dtype=torch.int, device=output.device), {"ref_logps": logps}

    def reference_logps(self, microbatches: list[dict]) -> None:
        """Attach ``ref_logps`` ([2m]: chosen then rejected) to each micro-batch (last stage)."""
        stores = forward_only(self.reference, microbatches, self._ref_loss_fn, seq_length=self.seq_length)
        for mb, d in zip(microbatches, stores):
            mb["ref_logps"] = d["ref_logps"]

    def precompute(self, batches_with_indices) -> None:
        """Fill the table from ``(microbatches, pair indices)`` and free the reference model."""
        self.table = {}
        for mbs, indices in batches_with_indices:
            self.reference_logps(mbs)
            m = mbs[0]["pairs"]
            for k, mb in enumerate(mbs):
                if "ref_logps" in mb:
                    for j, idx in enumerate(indices[k * m:(k + 1) * m]):
                        self.table[idx] = torch.stack([mb["ref_logps"][j], mb["ref_logps"][m + j]])
        self.reference = None

    def prepare(self, microbatches: list[dict], pair_indices=None) -> None:
        if self.table is None:
            self.reference_logps(microbatches)
            return
        if not self.table:  # not the last stage: the loss (and the table) live there
            return
        m = microbatches[0]["pairs"]
        for k, mb in enumerate(microbatches):
            rows = torch.stack([self.table[i] for i in pair_indices[k * m:(k + 1) * m]])
            mb["ref_logps"] = torch.cat([rows[:, 0], rows[:, 1]])

    # -- loss -------------------------------------------------------------------------------------
    def loss_fn(self, mb: dict, output: torch.Tensor):
        m = mb["pairs"]
        token_logps = -output.float()
        pi = losses.sequence_logps(token_logps, mb["loss_mask"], self.normalize)
        nll = -(pi[:m] if self.normalize else losses.sequence_logps(token_logps[:m], mb["loss_mask"][:m], True))
        ref = mb["ref_logps"]
        per_pair, chosen_r, rejected_r = losses.dpo_loss(pi[:m], pi[m:], ref[:m], ref[m:], self.beta,
                                                         chosen_nll=nll, nll_coef=self.nll_coef)
        sums = losses.dpo_metric_sums(per_pair, chosen_r, rejected_r, pi[:m], pi[m:], nll)
        return per_pair.sum(), torch.tensor(m, dtype=torch.int, device=output.device), sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {k: sums[k] / n for k in self.keys if k != "pairs"}

    def evaluate(self, policy, eval_batches: Sequence[list[dict]]) -> dict[str, float]:
        """Held-out DPO loss, reward accuracy (ties count 1/2), the policy's own preference
        accuracy and margin. ``eval_batches`` carry their reference log-probs already."""
        sums = dict.fromkeys(self.keys, 0.0)
        for mbs in eval_batches:
            for k, v in reduce_sums(forward_only(policy.ddp, mbs, self.loss_fn, seq_length=self.seq_length),
                                    self.keys).items():
                sums[k] += v
        return {**self.metrics(sums), "pairs": sums["pairs"]}
