"""What the training group computes per RL micro-batch, on Megatron's pipeline schedule.

Log-probs come from the policy's logits divided by the sampling temperature (vLLM sampled from
softmax(logits / T)), through Megatron's vocab-parallel cross entropy, so tensor parallelism
never gathers the vocabulary. The loss is the clipped policy gradient plus, for GRPO, the KL to
the frozen reference in the loss (`tulu.rl.losses.policy_loss`), summed over response tokens;
Megatron divides by the response tokens of the whole global batch.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from tulu.rl.losses import policy_loss


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(targets) per position from vocab-parallel logits [b, s, V/tp]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = (logits.float() / temperature).transpose(0, 1).contiguous()
    return -vocab_parallel_cross_entropy(scaled, targets.transpose(0, 1).contiguous()).transpose(0, 1)


def run_logits_schedule(model, microbatches: Sequence[dict], loss_fn: Callable, *, seq_length: int,
                        forward_only: bool) -> list[dict]:
    """Megatron's schedule with the model returning logits (no labels): RL needs log-probs at a
    temperature, which the model's built-in cross entropy does not take."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        return chunk(mb["tokens"], mb["position_ids"], mb["attention_mask"]), functools.partial(loss_fn, mb)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only)


class GRPOObjective:
    keys = ("loss", "pg_loss", "kl", "clip_frac", "approx_kl", "entropy_proxy", "sampler_kl", "tokens")

    def __init__(self, rl_cfg):
        self.cfg = rl_cfg
        self.T = rl_cfg.temperature

    def logprob_fn(self, key: str):
        """A loss function that only records `key` = per-token log-probs (forward-only passes)."""
        def fn(mb, logits):
            mb[key] = token_logprobs(logits, mb["targets"], self.T).detach()
            return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}
        return fn

    def loss_fn(self, mb: dict, logits: torch.Tensor):
        c = self.cfg
        logp = token_logprobs(logits, mb["targets"], self.T)
        mask = mb["mask"]
        out = policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask, clip_eps=c.clip_eps,
                          ref_logprobs=mb.get("ref_logprobs"), kl_beta=c.kl_beta, kl_estimator=c.kl_estimator)
        n = mask.sum()
        sampler_kl = ((mb["sampler_logprobs"] - mb["old_logprobs"]) * mask).sum()
        sums = {"loss": out.loss.detach() * n, "pg_loss": out.pg_loss.detach() * n, "kl": (out.ref_kl if out.ref_kl is not None else torch.zeros(())).detach() * n,
                "clip_frac": out.clip_frac.detach() * n, "approx_kl": out.approx_kl.detach() * n,
                "entropy_proxy": -(logp.detach() * mask).sum(), "sampler_kl": sampler_kl.detach(),
                "tokens": n.float()}
        return out.loss * n, n.to(torch.int), sums

    @staticmethod
    def metrics(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["tokens"], 1.0)
        return {k: sums[k] / n for k in GRPOObjective.keys if k != "tokens"} | {"response_tokens": sums["tokens"]}
