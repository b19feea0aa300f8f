"""What the training group computes per RL micro-batch, on Megatron's pipeline schedule.

Log-probs come from the policy's logits divided by the sampling temperature (vLLM sampled from
softmax(logits / T)), through Megatron's vocab-parallel cross entropy, so tensor parallelism
never gathers the vocabulary. The loss is the clipped policy gradient plus, for GRPO, the KL to
the frozen reference in the loss (`tulu.rl.losses.policy_loss`), summed over response tokens;
Megatron divides by the response tokens of the whole global batch.

PPO (Tülu 3 / open-instruct): the KL goes in the reward instead, ``r_t = -beta * KL_t`` plus the
verifier's score on the last response token; the value model's values (forward only) give GAE
advantages, whitened over the global batch's response tokens, and returns; the policy takes the
clipped loss without a KL term, the value model the clipped value loss x ``value_loss_coef``.
Values, like log-probs, exist on the last pipeline stage only, so everything between the
forward-only passes and the losses (:meth:`PPOObjective.prepare`) runs there.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import torch

from tulu.rl.losses import policy_loss, value_loss


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(targets) per position from vocab-parallel logits [b, s, V/tp]."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        # The whole vocabulary is here: no cross entropy with its three (one-rank) all-reduces,
        # a measurable share of a tiny model's step; chunked fp32 math, bounded memory.
        from tulu.rl.logprobs import selected_logprobs

        return selected_logprobs(logits, targets, temperature)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = (logits.float() / temperature).transpose(0, 1).contiguous()
    return -vocab_parallel_cross_entropy(scaled, targets.transpose(0, 1).contiguous()).transpose(0, 1)


def _inner(model):
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


@contextlib.contextmanager
def logits_from(model, start):
    """While active, ``model`` (a GPTModel, or a wrapper of one) computes logits at sequence
    positions ``start:`` only (an int), or at the positions an index tensor [b, k] names for each
    sequence (the shared-prompt layout, `tulu.rlvr.batch.shared_prompt_micro_batches`): a pre-hook
    on its output layer keeps only those hidden states, as Megatron's own inference path drops all
    but the last.
    The output layer, the log-softmax and their backward then run on the response positions alone;
    the prompt's logits carry no loss, so nothing else changes. A no-op for ``start == 0`` and on
    pipeline stages without the output layer."""
    inner = _inner(model)
    layer = getattr(inner, "output_layer", None) if getattr(inner, "post_process", False) else None
    index = isinstance(start, torch.Tensor)
    if layer is None or (not index and start <= 0):
        yield
        return
    if inner.config.sequence_parallel:
        raise ValueError("logits_from: with sequence parallelism the output layer gathers the sequence itself; "
                         "build the micro-batches without response_logits_only")

    def keep(_module, args, kwargs):
        hidden = args[0]  # [s, b, h]
        if not index:
            kept = hidden[start:]
        else:
            at = start.to(hidden.device).t()  # [k, b]
            kept = hidden.gather(0, at[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return (kept,) + tuple(args[1:]), kwargs

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def rope_positions(model, positions: torch.Tensor | None):
    """While active, ``model``'s rotary embedding gives position ``positions[k, i]`` to position i
    of sequence k instead of i (Megatron's GPTModel derives RoPE from the sequence index alone and
    ignores ``position_ids``): the embedding then has a batch dimension, [s, b, 1, dim], which
    Megatron's unfused RoPE broadcasts. None: a no-op."""
    rope = getattr(_inner(model), "rotary_pos_emb", None)
    if positions is None:
        yield
        return
    if rope is None:
        raise ValueError("rope_positions: the model has no rotary embedding")
    if getattr(_inner(model).config, "apply_rope_fusion", False):
        raise ValueError("rope_positions: per-sequence positions need the unfused RoPE (model.apply_rope_fusion false)")

    def remap(_module, _args, emb):  # [s, 1, 1, dim], position i in row i
        return emb[:, 0, 0][positions.to(emb.device).t()][:, :, None]  # [s, b, 1, dim]

    handle = rope.register_forward_hook(remap)
    try:
        yield
    finally:
        handle.remove()


def _per_rollout(loss_fn, mb, logits):
    """Shared-prompt logits [sequences, group * R, V] as [rollouts, R, V] rows."""
    b, s, v = logits.shape
    group = mb["rows_per_sequence"]
    return loss_fn(mb, logits.reshape(b * group, s // group, v))


def run_logits_schedule(model, microbatches: Sequence[dict], loss_fn: Callable, *, seq_length: int,
                        forward_only: bool) -> list[dict]:
    """Megatron's schedule with the model returning logits (no labels): RL needs log-probs at a
    temperature, which the model's built-in cross entropy does not take. Logits start at
    ``mb["logits_from"]`` where the micro-batch says so (`tulu.rlvr.batch.micro_batches`), or are
    taken at ``mb["logits_at"]`` with ``mb["rope_positions"]`` (the shared-prompt layout, whose
    sequences are ``mb["tokens"].shape[1]`` long: ``seq_length`` is then ignored)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        with logits_from(chunk, mb.get("logits_at", mb.get("logits_from", 0))), \
                rope_positions(chunk, mb.get("rope_positions")):
            out = chunk(mb["tokens"], mb["position_ids"], mb["attention_mask"])
        if "rows_per_sequence" in mb:
            return out, functools.partial(_per_rollout, loss_fn, mb)
        return out, functools.partial(loss_fn, mb)

    if "rows_per_sequence" in microbatches[0]:
        seq_length = microbatches[0]["tokens"].shape[1]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only)


def record_logprobs(key: str, temperature: float):
    """A loss function that only records ``mb[key]`` = per-token log-probs (forward-only passes)."""
    def fn(mb, logits):
        mb[key] = token_logprobs(logits, mb["targets"], temperature).detach()
        return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}
    return fn


class GRPOObjective:
    keys = ("loss", "pg_loss", "kl", "clip_frac", "approx_kl", "entropy_proxy", "sampler_kl", "tokens")

    def __init__(self, rl_cfg):
        self.cfg = rl_cfg
        self.T = rl_cfg.temperature
        self.loss_kl_beta = rl_cfg.kl_beta  # GRPO: the KL to the reference is in the loss

    def logprob_fn(self, key: str):
        """A loss function that only records `key` = per-token log-probs (forward-only passes)."""
        return record_logprobs(key, self.T)

    def loss_fn(self, mb: dict, logits: torch.Tensor):
        """The policy's loss on one micro-batch. ``mb["policy_logprobs"]``: the trainer's log-probs
        under the weights it held before this step's update (a forward-only pass; absent: this
        forward's own, detached, which are the same thing for the first optimizer step).
        ``mb["old_logprobs"]``: the behaviour policy's (absent: on-policy, the policy's)."""
        c = self.cfg
        logp = token_logprobs(logits, mb["targets"], self.T)
        mask = mb["mask"]
        policy_logp = mb.get("policy_logprobs")
        if policy_logp is None:
            policy_logp = logp.detach()
        old = mb.get("old_logprobs")
        out = policy_loss(logp, policy_logp if old is None else old, mb["advantages"], mask, clip_eps=c.clip_eps,
                          ref_logprobs=mb.get("ref_logprobs"), kl_beta=self.loss_kl_beta, kl_estimator=c.kl_estimator)
        n = mask.sum()
        sampler_kl = ((mb["sampler_logprobs"] - policy_logp) * mask).sum()
        sums = {"loss": out.loss.detach() * n, "pg_loss": out.pg_loss.detach() * n, "kl": (out.ref_kl if out.ref_kl is not None else torch.zeros(())).detach() * n,
                "clip_frac": out.clip_frac.detach() * n, "approx_kl": out.approx_kl.detach() * n,
                "entropy_proxy": -(logp.detach() * mask).sum(), "sampler_kl": sampler_kl.detach(),
                "tokens": n.float()}
        return out.loss * n, n.to(torch.int), sums

    @staticmethod
    def metrics(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["tokens"], 1.0)
        return {k: sums[k] / n for k in GRPOObjective.keys if k != "tokens"} | {"response_tokens": sums["tokens"]}


class PPOObjective(GRPOObjective):
    """PPO with a value model, Tülu 3 style (module doc). The policy's loss and its metrics are
    GRPO's with no KL term in the loss (the reference KL is still reported as ``kl``)."""

    value_keys = ("value_loss", "value_clip_frac", "values_mean", "value_tokens")
    prepare_keys = ("reward_kl", "non_score_reward", "raw_advantages", "returns", "returns_sq", "residual",
                    "residual_sq", "old_values", "prepare_tokens")

    def __init__(self, rl_cfg):
        super().__init__(rl_cfg)
        self.loss_kl_beta = 0.0  # the KL is in the reward
        # PPO2's value clipping range: `rlvr.value_clip` where the config has it, else clip_eps
        # (open-instruct's cliprange_value defaults to the policy's 0.2 as well).
        self.value_clip = getattr(rl_cfg, "value_clip", rl_cfg.clip_eps)

    @staticmethod
    def values_fn(mb: dict, values: torch.Tensor):
        """Forward-only pass of the value model: records ``mb["old_values"]`` [b, s]."""
        mb["old_values"] = values[..., 0].float().detach()
        return values.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

    def prepare(self, microbatches: Sequence[dict]) -> list[dict]:
        """After the forward-only passes, on the last pipeline stage: per-token rewards (score on
        the last response token, -kl_beta x KL(policy before the update || reference) on every one), GAE
        advantages and returns (``mb["returns"]``), advantages whitened over the response tokens
        of the global batch (all-reduced over data parallelism) into ``mb["advantages"]``.
        Returns the metric sums of :attr:`prepare_keys` ([] on other stages)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from tulu.rl.advantages import gae_advantages
        from tulu.rl.kl import kl_estimate, kl_penalized_rewards

        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return []
        c = self.cfg
        stores = []
        moments = torch.zeros(3, dtype=torch.float64, device=microbatches[0]["mask"].device)
        for mb in microbatches:
            mask = mb["mask"]
            if "ref_logprobs" in mb:
                kl = torch.where(mask, kl_estimate(mb["policy_logprobs"], mb["ref_logprobs"], c.kl_estimator), 0.0)
            else:
                kl = torch.zeros_like(mb["policy_logprobs"])
            rewards = kl_penalized_rewards(mb["scores"], kl, mask, beta=c.kl_beta)
            adv, ret = gae_advantages(rewards, mb["old_values"], mask, gamma=c.gamma, lam=c.gae_lambda)
            mb["raw_advantages"], mb["returns"] = adv, ret
            a = adv[mask].double()
            moments += torch.stack([a.sum(), (a * a).sum(), mask.sum().double()])
            r, v = ret[mask].double(), mb["old_values"][mask].double()
            stores.append({"reward_kl": kl[mask].sum(), "non_score_reward": -c.kl_beta * kl[mask].sum(),
                           "raw_advantages": a.sum(), "returns": r.sum(), "returns_sq": (r * r).sum(),
                           "residual": (r - v).sum(), "residual_sq": ((r - v) ** 2).sum(), "old_values": v.sum(),
                           "prepare_tokens": mask.sum().double()})
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(moments, group=ps.get_data_parallel_group())
        total, total_sq, n = moments.tolist()
        mean = total / max(n, 1.0)
        var = max(total_sq - n * mean * mean, 0.0) / max(n - 1.0, 1.0)  # Bessel, as masked_whiten
        scale = (var + 1e-8) ** -0.5
        for mb in microbatches:
            mb["advantages"] = torch.where(mb["mask"], (mb["raw_advantages"] - mean) * scale, 0.0)
        return stores

    def value_loss_fn(self, mb: dict, values: torch.Tensor):
        """Clipped value loss x value_loss_coef, summed over response tokens (Megatron divides by
        the global batch's response tokens); the metric is the loss without the coefficient."""
        mask = mb["mask"]
        out = value_loss(values[..., 0], mb["old_values"], mb["returns"], mask, value_clip=self.value_clip, coef=1.0)
        n = mask.sum()
        sums = {"value_loss": out.loss.detach() * n, "value_clip_frac": out.clip_frac * n,
                "values_mean": out.values_mean * n, "value_tokens": n.float()}
        return out.loss * self.cfg.value_loss_coef * n, n.to(torch.int), sums

    @staticmethod
    def ppo_metrics(prep: dict[str, float], value: dict[str, float]) -> dict[str, float]:
        n, nv = max(prep["prepare_tokens"], 1.0), max(value["value_tokens"], 1.0)
        var_ret = prep["returns_sq"] - prep["returns"] ** 2 / n
        var_res = prep["residual_sq"] - prep["residual"] ** 2 / n
        return {"value_loss": value["value_loss"] / nv, "value_clip_frac": value["value_clip_frac"] / nv,
                "values_mean": value["values_mean"] / nv, "old_values_mean": prep["old_values"] / n,
                "returns_mean": prep["returns"] / n, "raw_advantages_mean": prep["raw_advantages"] / n,
                "reward_kl": prep["reward_kl"] / n, "non_score_reward": prep["non_score_reward"] / n,
                "explained_variance": 1.0 - var_res / var_ret if var_ret > 0 else 0.0}


def _train_pass(model, microbatches: Sequence[dict], loss_fn: Callable, *, lr: float, seq_length: int):
    """One optimizer step of ``model`` (a Policy or ValueModel) over the micro-batches."""
    from tulu.train.step import train_step

    return train_step(model, microbatches, loss_fn, lr=lr, seq_length=seq_length, schedule=run_logits_schedule)


def ppo_step(objective: PPOObjective, policy, value, reference, microbatches: Sequence[dict], *, seq_length: int,
             lr: float, value_lr: float, epochs: int = 1) -> dict[str, float]:
    """One RL step of PPO on this data-parallel rank's micro-batches (they must carry ``scores``):
    the policy's log-probs before the update (``policy_logprobs``), reference log-probs
    (``reference`` may be None: no KL) and old values, forward only; advantages and returns; then
    per epoch one policy and one value optimizer step over all micro-batches. The ratio's old
    log-probs are ``mb["old_logprobs"]`` where the caller set them (off-policy rollouts: the
    behaviour policy's), else the policy's before the update. Metrics are averaged over the
    epochs; identical on every training rank."""
    from tulu.train.step import reduce_sums

    L = seq_length
    with torch.no_grad():
        policy.ddp.eval()
        run_logits_schedule(policy.ddp, microbatches, objective.logprob_fn("policy_logprobs"), seq_length=L,
                            forward_only=True)
        if reference is not None:
            run_logits_schedule(reference, microbatches, objective.logprob_fn("ref_logprobs"), seq_length=L,
                                forward_only=True)
        value.ddp.eval()
        run_logits_schedule(value.ddp, microbatches, objective.values_fn, seq_length=L, forward_only=True)
    prep_stores = objective.prepare(microbatches)
    policy_stores, value_stores, grad_norms, value_grad_norms = [], [], [], []
    for _ in range(epochs):
        stores, g = _train_pass(policy, microbatches, objective.loss_fn, lr=lr, seq_length=L)
        policy_stores += stores
        grad_norms.append(g)
        stores, g = _train_pass(value, microbatches, objective.value_loss_fn, lr=value_lr, seq_length=L)
        value_stores += stores
        value_grad_norms.append(g)
    prep = reduce_sums(prep_stores, objective.prepare_keys)
    sums = reduce_sums(policy_stores, objective.keys)
    vsums = reduce_sums(value_stores, objective.value_keys)
    out = {**objective.metrics(sums), "response_tokens": prep["prepare_tokens"],
           **objective.ppo_metrics(prep, vsums)}
    return {**out, "grad_norm": sum(grad_norms) / epochs, "value_grad_norm": sum(value_grad_norms) / epochs,
            "lr": lr, "value_lr": value_lr}
