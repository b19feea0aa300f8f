"""The training group of an RLVR job: Megatron policy + frozen reference, one RL step at a time.

    per step: request rollouts (control "go" + the weights version, `tulu.rlvr.rollout_schedule`)
              -> weight sync (stage leaders send; at TP 1 from a thread, which the optimizer step
              waits for: the send overlaps forward and backward; with rollouts a step ahead it
              starts after they are collected and scored) -> this step's rollouts from the
              engines, scored by the verifiers (process pools, time-outs) on the engines beside
              their reference pass, or here (rlvr.score_on, `tulu.rlvr.scoring`) ->
              group-normalised advantages ->
              reference log-probs (forward only) -> clipped policy loss + KL -> optimizer step
              -> metrics -> checkpoint (interval; RL counters and in-flight rollouts inside) ->
              stop agreement
    The ratio's "old" log-probs are the behaviour policy's. On-policy (the rollouts came from the
              weights being trained: always with rlvr.async_steps 0) GRPO's single optimizer step
              starts from exactly those weights, so the training forward's own detached log-probs
              are the old ones (as TRL does) and no separate forward pass runs. Off-policy
              (async_steps >= 1) the weights that sampled are gone, and the engine's sampled-token
              log-probs, the very distribution the tokens were drawn from, are used instead (RLVR
              samples with top-p 1, so they are log-softmax(logits / T), what the trainer computes).
    `sampler_kl` = mean over response tokens of (engine log-prob - the trainer's log-prob under
              the weights it holds at the step's start). On-policy it is ~0 exactly when the weight
              sync works; off-policy it also measures how far one step moved the policy (> 0 is
              expected, a k1 estimate of KL(behaviour || current), noisy on small batches).
    Metrics also say which weights version (the learner step that held it) generated the step's
              rollouts (`rollout_policy_version`: step - 1 - async_steps once the pipeline is full,
              with 1-based metric steps) and how long the learner waited for them
              (`rollout_wait_s`: ~0 when generation keeps up with training); `learner_cpu_s` and
              `engine_cpu_s` are the CPU seconds the learner's leader and the engine process spent
              on the step (on a CPU-only machine the step takes at least their sum when synchronous,
              their maximum when they overlap).
    PPO (rlvr.algorithm: ppo) replaces the middle: the policy's log-probs before the update (the
              ratio's old ones unless off-policy), reference log-probs and the value model's values
              (forward only) -> KL in the reward, GAE -> one policy and one value
              optimizer step per epoch (tulu.train.rl_objectives.ppo_step); the value model and its
              optimizer are saved in the same checkpoint as the policy (tulu.rlvr.value).
The role's rank 0 (pipeline stage 0's leader, bridge rank 0) talks to the inference group,
scores what came unscored, and broadcasts the batch to the other training ranks.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tulu.checkpoint import CheckpointManager, fingerprint
from tulu.config.job import ConfigError
from tulu.dist import groups as tdist
from tulu.dist.weight_sync import send_weights
from tulu.models.convert import hf_weight_index, iter_hf_weights
from tulu.rewards import RewardScorer
from tulu.rl.advantages import grpo_advantages
from tulu.rl.reward import verifier_accuracy
from tulu.rlvr import protocol, scoring
from tulu.rlvr.background import Background
from tulu.rlvr.batch import (Rollout, build_batch, groups_by_length, micro_batches, shared_prompt_flops_ratio,
                             shared_prompt_micro_batches)
from tulu.rlvr.prompts import PromptSet, prompt_files, read_rows
from tulu.rlvr.rollout_schedule import RolloutSchedule
from tulu.rlvr.value import PolicyAndValueState, build_value_model, value_lr
from tulu.train import model as tmodel
from tulu.train.batches import to_device
from tulu.train.data import build_tokenizer
from tulu.train.metrics import MetricsLog, plot_loss_curve
from tulu.train.model import ModelSource
from tulu.train.rl_objectives import GRPOObjective, PPOObjective, ppo_step, run_logits_schedule
from tulu.train.schedule import LRSchedule
from tulu.train.step import device, reduce_sums
from tulu.train.world import close_training_world, form_training_world


@dataclass
class Models:
    """What the learner trains and what it holds fixed, and the one model + optimizer pair the
    checkpoint manager saves (PPO: policy and value model together, so one manifest commits both)."""

    source: ModelSource
    tokenizer: Any
    policy: Any
    reference: Any | None
    value: Any | None
    saved_model: Any
    saved_optimizer: Any
    fingerprint: dict


def check_algorithm(rl) -> bool:
    """Whether the config asks for PPO (else GRPO); refuses what neither can run."""
    if rl.algorithm not in ("grpo", "ppo"):
        raise ConfigError("rlvr.algorithm", f"got {rl.algorithm!r}; use 'grpo' or 'ppo'")
    if rl.algorithm == "ppo" and rl.ppo_epochs < 1:
        raise ConfigError("rlvr.ppo_epochs", f"got {rl.ppo_epochs}; PPO needs >= 1 epoch over each batch")
    return rl.algorithm == "ppo"


def check_rollout_split(rl, micro_batch_size: int, dp: int) -> None:
    rollouts = rl.prompts_per_step * rl.samples_per_prompt
    if rollouts % (dp * micro_batch_size):
        raise ConfigError("rlvr.prompts_per_step", f"got {rl.prompts_per_step}; prompts_per_step x "
                          f"samples_per_prompt ({rollouts}) must be a multiple of micro_batch_size x DP "
                          f"({micro_batch_size} x {dp})")


def build_models(cfg, ppo: bool) -> Models:
    """Policy, the frozen KL reference (kl_beta > 0) and PPO's value model, in that order (the
    seeded initialisation of a tiny model depends on it)."""
    source = tmodel.resolve_model(cfg.model, cfg.run.seed)
    tokenizer = build_tokenizer(source.tokenizer)
    policy = tmodel.build_policy(cfg, source)
    reference = tmodel.build_reference(cfg, source) if cfg.rlvr.kl_beta > 0 else None
    fp = fingerprint(cfg)
    if not ppo:
        return Models(source, tokenizer, policy, reference, None, policy.module, policy.optimizer, fp)
    value = build_value_model(cfg, source)
    both = PolicyAndValueState(policy, value)
    fp["rlvr.algorithm"] = "ppo"  # a GRPO checkpoint has no value model: refused by name
    return Models(source, tokenizer, policy, reference, value, both, both.optimizer, fp)


@dataclass
class LeaderIO:
    """What only the learner's leader holds: the prompt set, the verifiers and the metrics log."""

    prompts: PromptSet
    scorer: RewardScorer | None
    metrics: MetricsLog


def build_leader_io(ctx, tokenizer, step: int) -> LeaderIO:
    cfg, rl = ctx.cfg, ctx.cfg.rlvr
    train_file, _ = prompt_files(cfg)
    prompts = PromptSet(read_rows(train_file, cfg.data.split, cfg.data.cache_dir), tokenizer,
                        cfg.data.shuffle_seed, cfg.groups.inference.max_model_len - rl.response_length)
    # with rlvr.score_on engine the engines score, and a scorer starts here only if a payload
    # comes without results (`Learner._score_missing`)
    scorer = scoring.build_scorer(rl, (p.dataset for p in prompts.prompts)) if rl.score_on == "learner" else None
    metrics = MetricsLog(ctx.run_dir, log=ctx.log)
    metrics.truncate_after(step)
    return LeaderIO(prompts, scorer, metrics)


def build_learner(ctx) -> "Learner":
    """The setup phase: groups, models, objective, schedule, checkpoint (resumed from the newest
    verified one), the bridge to the engines and, on the leader, prompts, verifiers and metrics."""
    cfg, rl = ctx.cfg, ctx.cfg.rlvr
    ppo = check_algorithm(rl)
    dp, dp_rank = form_training_world(ctx)
    check_rollout_split(rl, cfg.groups.training.micro_batch_size, dp)
    models = build_models(cfg, ppo)
    ckpt = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                             config_fingerprint=models.fingerprint)
    learner = Learner(ctx, models, objective=PPOObjective(rl) if ppo else GRPOObjective(rl),
                      schedule=LRSchedule.from_optim(rl.optim, rl.steps), ckpt=ckpt, dp=dp, dp_rank=dp_rank)
    stored = learner.resume() if cfg.checkpoint.load else {}
    learner.rollouts = RolloutSchedule.starting_at(learner.step, async_steps=rl.async_steps, total_steps=rl.steps,
                                                   stored=len(stored))
    role = ctx.role
    learner.bridge = tdist.BridgeGroup.for_role(ctx.plan, role, ctx.env, cfg.monitoring.collective_timeout_s) \
        if role.bridge_rank is not None else None
    if rl.reference_in_engine:
        # the engines score against the reference (sent before the START); this group keeps
        # no copy and runs no reference pass
        learner.send_reference()
        learner.reference = None
    if learner.is_leader:
        io = build_leader_io(ctx, learner.tokenizer, learner.step)
        learner.prompts, learner.scorer, learner.metrics = io.prompts, io.scorer, io.metrics
        learner.pending = stored
        protocol.put(learner.bridge.store, protocol.START, learner.rollouts.next_generated)
    ctx.log(f"rlvr {rl.algorithm}: steps {learner.step}..{rl.steps}, {rl.prompts_per_step} prompts x "
            f"{rl.samples_per_prompt} samples, TP{ctx.plan.training_tp} PP{ctx.plan.training_pp} DP{dp}, "
            f"{ctx.plan.inference_engines} inference engine(s), rollouts {rl.async_steps} step(s) ahead")
    return learner


class Learner:
    """One RL step at a time (`run`); built by `build_learner`."""

    def __init__(self, ctx, models: Models, *, objective, schedule: LRSchedule, ckpt: CheckpointManager,
                 dp: int, dp_rank: int):
        self.ctx, self.cfg, self.rl = ctx, ctx.cfg, ctx.cfg.rlvr
        self.ppo = self.rl.algorithm == "ppo"
        self.source, self.tokenizer = models.source, models.tokenizer
        self.policy, self.reference, self.value = models.policy, models.reference, models.value
        self.saved_model, self.saved_optimizer = models.saved_model, models.saved_optimizer
        self.objective, self.schedule, self.ckpt = objective, schedule, ckpt
        self.dp, self.dp_rank = dp, dp_rank
        self.is_leader = ctx.role.role_rank == 0
        role = ctx.role
        self.sends_weights = role.tp_rank == 0 and role.dp_rank == 0  # the stage leaders (bridge members)
        self.gathers_weights = role.dp_rank == 0  # TP peers of a leader take part in the TP gather
        self.prompt_sharing_possible = self._prompt_sharing_possible(self.cfg.groups.training.micro_batch_size)
        self.step = 0
        self.bridge = None
        self.rollouts: RolloutSchedule | None = None
        self.prompts: PromptSet | None = None
        self.metrics: MetricsLog | None = None
        self.scorer: RewardScorer | None = None  # the leader's, when it scores (`_score_missing`)
        self.score_errors = 0  # verifier errors (a verifier raised or its worker died) since the start
        self.pending: dict[int, list[dict]] = {}  # leader: rollouts read from the store, not yet trained on
        self._sender: Background | None = None  # the background weight sends' thread
        self._sending: Future | None = None  # this step's send
        self._send_bridge = None  # `_sender_bridge`

    def resume(self) -> dict[int, list[dict]]:
        """Load the newest verified checkpoint, if any; returns the in-flight rollouts it holds
        that were generated under this run's settings (trained on as the uninterrupted run does)."""
        loaded = self.ckpt.load(self.saved_model, optimizer=self.saved_optimizer, lr_scheduler=self.schedule)
        if loaded is None:
            return {}
        if self.ppo:
            self.saved_model.restore(loaded.model_state)
        self.step = loaded.step
        stored = self._stored_rollouts(loaded.data_state)
        what = "policy, value model and their optimizers" if self.ppo else "policy and optimizer"
        held = f"; steps {min(stored)}..{max(stored)} train on the in-flight rollouts it holds" if stored else ""
        self.ctx.log(f"resumed from {loaded.path} at step {loaded.step} ({what}); the inference group gets "
                     f"these weights before the first rollout{held}")
        return stored

    def _prompt_sharing_possible(self, micro_batch_size: int) -> bool:
        """The shared-prompt layout needs GRPO, micro-batches of whole groups, and the whole
        sequence at the output layer (no sequence or context parallelism); "always" insists."""
        rl, c = self.rl, self.policy.module.config
        why = ("PPO's value model scores every position" if self.ppo else
               f"micro_batch_size {micro_batch_size} is not a multiple of samples_per_prompt {rl.samples_per_prompt}"
               if micro_batch_size % rl.samples_per_prompt else
               "sequence parallelism splits the sequence" if c.sequence_parallel else
               "context parallelism splits the sequence" if c.context_parallel_size > 1 else None)
        if why and rl.prompt_sharing == "always":
            raise ConfigError("rlvr.prompt_sharing", f"'always' cannot apply: {why}; use 'auto' or 'never'")
        return why is None

    def _rollout_settings(self) -> dict:
        """What stored rollouts must have been generated under to be trained on after a resume."""
        rl, data = self.rl, self.cfg.data
        # the prompt set (a rollout names prompts by index), the step's prompts, and the sampling
        return {"train": data.train, "synthetic": data.synthetic, "synthetic_size": data.synthetic_size,
                "shuffle_seed": data.shuffle_seed, "max_model_len": self.cfg.groups.inference.max_model_len,
                "prompts_per_step": rl.prompts_per_step, "samples_per_prompt": rl.samples_per_prompt,
                "response_length": rl.response_length, "temperature": rl.temperature, "seed": self.cfg.run.seed,
                "reference_in_engine": rl.reference_in_engine}

    def _stored_rollouts(self, data_state) -> dict[int, list[dict]]:
        """The checkpoint's in-flight rollouts (steps step, step + 1, ...), or {} when it holds none
        or they were generated under other settings (then they are generated again, with the
        checkpoint's weights). Every training rank decides alike: same file, same config."""
        state = data_state if isinstance(data_state, dict) else {}
        held = {int(k): v for k, v in (state.get("in_flight_rollouts") or {}).items()}
        if not held:
            return {}
        if state.get("rollout_settings") != self._rollout_settings() or \
                sorted(held) != list(range(self.step, self.step + len(held))):
            self.ctx.log(f"the checkpoint's in-flight rollouts (steps {sorted(held)}) were generated under other "
                         "settings; generating those steps again with the checkpoint's weights")
            return {}
        return held

    # ------------------------------------------------------------------ phases
    def _send_model(self, model, version: int):
        """Stream ``model``'s stage to the inference group as weights ``version``; the stage
        leader's send stats (None on other ranks). TP peers of a leader take part in the gather."""
        if not self.gathers_weights:
            return None
        # views of the parameters where possible: the optimizer step waits for the send
        named = iter_hf_weights(model, self.source.hf_config, copy=False)
        if not self.sends_weights:
            for _ in named:  # TP peers: the gather is collective
                pass
            return None
        # the stage's whole [name, shape, dtype] list goes first: engines check it up front
        return send_weights(self._sender_bridge(), self.ctx.role.pp_rank, named, version=version,
                            bucket_bytes=int(self.rl.weight_sync_bucket_mb * 2**20),
                            index=hf_weight_index(model, self.source.hf_config))

    def sync_weights(self) -> dict:
        cpu0 = time.thread_time()
        st = self._send_model(self.policy.module, self.step)
        if st is None:
            return {}
        return {"weight_sync_bytes": st.bytes, "weight_sync_buckets": st.buckets, "weight_sync_send_s": st.seconds,
                "weight_sync_send_cpu_s": time.thread_time() - cpu0}

    def _sends_in_background(self) -> bool:
        """A stage leader that needs no collective to read its weights (TP 1) sends them from a
        thread while its forward and backward run (and, with synchronous rollouts, while they are
        scored); the optimizer waits for it (`_await_send`), as the weights must not change mid-send."""
        return self.sends_weights and self.ctx.plan.training_tp == 1

    def _sender_bridge(self):
        """The bridge the weights go over. A background sender's is a view with its own store
        client (the training thread blocks on the store meanwhile), made once, so the reference
        and every policy version share its pack buffers."""
        if not self._sends_in_background():
            return self.bridge
        if self._send_bridge is None:
            self._send_bridge = self.bridge.with_own_store()
        return self._send_bridge

    def _start_send(self) -> None:
        self._sender_bridge()  # made here, not in the thread
        if self._sender is None:  # one thread for the run: starting one per step kept the step waiting
            self._sender = Background("weight-send")
        self._sending = self._sender.submit(self.sync_weights)

    def _await_send(self) -> dict:
        """Wait for the background send of this step's weights (if any); its stats (its error is
        raised here)."""
        if self._sending is None:
            return {}
        sending, self._sending = self._sending, None
        t0 = time.perf_counter()
        with self.ctx.phase("weight_sync", self.step):
            stats = sending.result()
        return {**stats, "weight_sync_wait_s": time.perf_counter() - t0}

    def send_reference(self) -> None:
        """The KL reference's weights to the inference group, once per attempt (they score)."""
        self._send_model(self.reference, protocol.REFERENCE_VERSION)

    def collect_and_score(self) -> tuple[list[Rollout], dict]:
        """Leader only: rollouts of every engine, scored; returns them with per-phase metrics."""
        rl = self.rl
        rollouts: list[Rollout] = []
        gen_s, sync_s, ref_s, stop = 0.0, 0.0, 0.0, False
        t0 = time.perf_counter()
        payloads = self._read_rollouts(self.step)
        del self.pending[self.step]
        wait_s = time.perf_counter() - t0
        versions = {p["policy_version"] for p in payloads}
        if len(versions) != 1:
            raise RuntimeError(f"step {self.step}: the engines generated with different weights versions {versions}")
        engine_cpu_s = max(p["engine_cpu_s"] for p in payloads)
        results: list = []
        engine_score_s = 0.0
        for payload in payloads:
            gen_s, sync_s = max(gen_s, payload["generate_s"]), max(sync_s, payload["weight_sync_s"])
            stop = stop or payload["stop_requested"]
            ref_s = max(ref_s, payload.get("reference_s", 0.0))
            scored = scoring.decode(payload["scores"]) if "scores" in payload else [None] * len(payload["completions"])
            self.score_errors += payload.get("score_errors", 0)
            engine_score_s = max(engine_score_s, payload.get("score_wait_s", 0.0))
            for (pi, si, ids, lps, finish, *ref), result in zip(payload["completions"], scored, strict=True):
                p = self.prompts.prompts[payload["prompts"][pi]]
                rollouts.append(Rollout(p.index, p.token_ids, ids, lps, finish, p.dataset, p.ground_truth,
                                        ref_logprobs=ref[0] if ref else None))
                results.append(result)
        # group by prompt (GRPO groups are contiguous per prompt, samples in order)
        order = self.prompts.for_step(self.step, rl.prompts_per_step)
        rank = {p.index: k for k, p in enumerate(order)}
        by_prompt = sorted(range(len(rollouts)), key=lambda i: rank[rollouts[i].prompt_index])
        rollouts, results = [rollouts[i] for i in by_prompt], [results[i] for i in by_prompt]
        t0 = time.perf_counter()
        self._results = self._score_missing(rollouts, results)
        score_s = time.perf_counter() - t0
        if stop:
            self.ctx.stop.requested = True  # an inference rank got the signal: the learner agrees on it
        timing = {"reference_s": ref_s} if self.rl.reference_in_engine else {}
        timing.update({"engine_score_wait_s": engine_score_s} if rl.score_on == "engine" else {})
        return rollouts, {**timing, "generate_s": gen_s, "weight_sync_s": sync_s, "score_s": score_s,
                          "rollout_wait_s": wait_s,
                          "engine_cpu_s": engine_cpu_s, "rollout_policy_version": versions.pop()}

    def _score_missing(self, rollouts: list[Rollout], results: list) -> list:
        """``results`` with the rollouts that came without one (rlvr.score_on learner, or stored by
        an older checkpoint) scored here."""
        todo = [i for i, r in enumerate(results) if r is None]
        if not todo:
            return results
        if self.scorer is None:
            self.ctx.log(f"step {self.step}: {len(todo)} rollout(s) came without verifier results; scoring them here")
            self.scorer = scoring.build_scorer(self.rl, (p.dataset for p in self.prompts.prompts))
        prompts = self.prompts.prompts
        mine, errors = scoring.score(self.scorer, scoring.rows(
            [prompts[rollouts[i].prompt_index] for i in todo], [rollouts[i].response_ids for i in todo], self.tokenizer))
        self.score_errors += errors
        results = list(results)
        for i, r in zip(todo, mine, strict=True):
            results[i] = r
        return results

    def _read_rollouts(self, step: int) -> list[dict]:
        """Leader: every engine's payload for ``step`` (blocks until generated), once."""
        if step not in self.pending:
            self.pending[step] = [protocol.take(self.bridge.store, protocol.rollout_key(step, e))
                                  for e in range(self.ctx.plan.inference_engines)]
        return self.pending[step]

    def make_batch(self, rollouts, results):
        scores = torch.tensor([r.reward for r in results], dtype=torch.float32)
        # PPO's advantages are per token, computed in train_on from the value model's values
        adv = torch.zeros_like(scores) if self.ppo else grpo_advantages(scores, self.rl.samples_per_prompt)
        # rows padded to a multiple of TP only (sequence parallelism splits the sequence); a
        # rounder length would just add padded positions to every forward and backward pass
        return build_batch(rollouts, scores, adv, pad_id=self.tokenizer.pad_token_id or 0,
                           multiple=self.ctx.plan.training_tp)

    def _share_prompts(self, rows) -> bool:
        """Whether this rank's GRPO passes take each prompt once per group (rlvr.prompt_sharing;
        "auto": when the FLOP estimate is lower, `tulu.rlvr.batch.shared_prompt_flops_ratio`)."""
        mode, group = self.rl.prompt_sharing, self.rl.samples_per_prompt
        if mode == "never" or not self.prompt_sharing_possible:
            return False
        if mode == "always":
            return True
        c = self.policy.module.config
        kv = c.num_query_groups or c.num_attention_heads
        attn = c.hidden_size * c.kv_channels * (2 * c.num_attention_heads + 2 * kv)
        mlp = c.hidden_size * c.ffn_hidden_size * (3 if c.gated_linear_unit else 2)
        return shared_prompt_flops_ratio(rows, group, c.hidden_size, attn + mlp) < 0.95

    def train_on(self, batch, on_policy: bool) -> dict:
        n = batch.tokens.shape[0] // self.dp
        mine = batch.rows(self.dp_rank * n, (self.dp_rank + 1) * n)
        size = self.cfg.groups.training.micro_batch_size
        if self._share_prompts(mine):
            # groups of similar length share a micro-batch, whose sequences are as long as its longest
            mine = groups_by_length(mine, self.rl.samples_per_prompt)
            mbs = shared_prompt_micro_batches(mine, size, self.rl.samples_per_prompt,
                                              pad_id=self.tokenizer.pad_token_id or 0,
                                              fixed_length=self.ctx.plan.training_pp > 1)
        else:
            # GRPO's passes need logits at response positions only; PPO's value model scores every
            # position, and sequence parallelism leaves the sequence to the output layer
            mbs = micro_batches(mine, size, response_logits_only=not self.ppo
                                and not self.policy.module.config.sequence_parallel)
        for k, mb in enumerate(mbs):
            mb["scores"] = mine.scores[k * size:(k + 1) * size]
        if not on_policy:  # the behaviour policy's log-probs: the engine's (module doc)
            for mb in mbs:
                mb["old_logprobs"] = mb["sampler_logprobs"]
        mbs = [to_device(mb, device()) for mb in mbs]  # a no-op on CPU
        L = batch.seq_length  # run_logits_schedule takes a shared-prompt batch's length from it
        if self.ppo:
            sent = self._await_send()
            lr = self.schedule.current_lr
            # the value model follows the policy's schedule, scaled to rlvr.value_lr
            v_lr = lr * value_lr(self.rl) / self.rl.optim.lr
            out = ppo_step(self.objective, self.policy, self.value, self.reference, mbs, seq_length=L, lr=lr,
                           value_lr=v_lr, epochs=self.rl.ppo_epochs)
            self.schedule.advance()
            return {**out, **sent}
        # No old-log-prob pass: GRPO takes one optimizer step, so on-policy the old log-probs are
        # the training forward's own (detached); off-policy they are the engine's (set above).
        if self.rl.reference_in_engine and any("ref_logprobs" not in mb for mb in mbs):
            raise RuntimeError(f"step {self.step}: rlvr.reference_logprobs is 'inference' but the rollouts carry no "
                               "reference log-probs")
        if self.reference is not None:
            with torch.no_grad():
                run_logits_schedule(self.reference, mbs, self.objective.logprob_fn("ref_logprobs"), seq_length=L,
                                    forward_only=True)
        p = self.policy
        p.ddp.train()
        p.ddp.zero_grad_buffer()
        p.optimizer.zero_grad()
        lr = self.schedule.current_lr
        p.set_lr(lr)
        stores = run_logits_schedule(p.ddp, mbs, self.objective.loss_fn, seq_length=L, forward_only=False)
        sent = self._await_send()
        ok, grad_norm, _ = p.optimizer.step()
        if not ok:
            raise FloatingPointError("the optimizer skipped the step (inf/nan gradients)")
        self.schedule.advance()
        sums = reduce_sums(stores, self.objective.keys)
        return {**self.objective.metrics(sums), "grad_norm": float(grad_norm or 0.0), "lr": lr, **sent}

    def save(self) -> None:
        self.ctx.fault_point("checkpoint", self.step)
        with self.ctx.phase("checkpoint", self.step):
            path = self.ckpt.save(self.step, self.saved_model, optimizer=self.saved_optimizer,
                                  lr_scheduler=self.schedule, data_state=self._data_state(),
                                  extra_state={"model_source": self.source.describe(),
                                               "rl": {"algorithm": self.rl.algorithm, "step": self.step}})
        self.ctx.log(f"checkpoint step {self.step} saved to {path}")

    def _data_state(self) -> dict:
        """RL counters, and the rollouts requested but not trained on yet (generated with older
        weights than the checkpoint's): a resume trains on them as the uninterrupted run does."""
        state = {"rl_step": self.step}
        in_flight = self.rollouts.in_flight(self.step)
        if in_flight and self.is_leader:  # only rank 0's data_state is written
            state["in_flight_rollouts"] = {g: self._read_rollouts(g) for g in in_flight}
            state["rollout_settings"] = self._rollout_settings()
        return state

    def request_rollouts(self) -> dict:
        """Ask the engines for the rollouts the schedule wants now, and send the weights they need."""
        todo = self.rollouts.requests(self.step)
        if self.is_leader:
            for g in todo:
                protocol.put(self.bridge.store, protocol.control_key(g), protocol.go(self.step))
        if not todo:
            return {}
        self.ctx.fault_point("weight_sync", self.step)
        if self._sends_in_background():
            self._start_send()
            return {}
        with self.ctx.phase("weight_sync", self.step):
            return self.sync_weights()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        ctx, rl = self.ctx, self.rl
        last: dict = {}
        stopped = False
        while self.step < rl.steps:
            t_step, cpu_step = time.perf_counter(), time.process_time()
            # Rollouts requested at an earlier step (async_steps >= 1) are collected and scored
            # before this step's weights go out: the send's thread would slow the scoring it ran
            # beside, and the engines, a step ahead, can wait those few ms.
            ahead = self.rollouts.next_generated > self.step
            sync = {} if ahead else self.request_rollouts()
            batch_obj = [None]
            timing: dict = {}
            if self.is_leader:
                with ctx.phase("generate", self.step):  # waiting for the engines
                    rollouts, timing = self.collect_and_score()
            if ahead:
                sync = self.request_rollouts()
            if self.is_leader:
                batch = self.make_batch(rollouts, self._results)
                verified = torch.tensor([r.verified for r in self._results], dtype=torch.float32)
                acc = verifier_accuracy(verified, [r.dataset for r in rollouts])
                lengths = [len(r.response_ids) for r in rollouts]
                info = {"reward_mean": float(batch.scores.mean()), "verified": acc,
                        "response_length": sum(lengths) / len(lengths),
                        "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
                        "generated_tokens": sum(lengths), "score_errors": self.score_errors,
                        "stop": ctx.stop.requested, **timing, **sync}
                batch_obj = [(batch, info)]
            with ctx.phase("train", self.step):
                if dist.get_world_size() > 1:  # the leader built it; a one-rank group has nobody to tell
                    dist.broadcast_object_list(batch_obj, src=0)
                batch, info = batch_obj[0]
                ctx.stop.requested = ctx.stop.requested or info["stop"]
                t0 = time.perf_counter()
                ctx.fault_point("train", self.step)
                train = self.train_on(batch, on_policy=info["rollout_policy_version"] == self.step)
                train_s = time.perf_counter() - t0
            self.step += 1
            ctx.step_done(self.step)
            step_s = time.perf_counter() - t_step
            last = {**{k: v for k, v in info.items() if k != "stop"}, **train, "train_s": train_s, "step_s": step_s,
                    "learner_cpu_s": time.process_time() - cpu_step,
                    "generate_tokens_per_s": info["generated_tokens"] / max(info.get("generate_s", 0) or 1e-9, 1e-9)}
            if self.metrics:
                flat = {k: v for k, v in last.items() if k != "verified"}
                flat.update({f"verified_{k}": v for k, v in info["verified"].items()})
                self.metrics.write("train", self.step, flat)
            done = self.step == rl.steps
            saved = done or self.step % self.cfg.checkpoint.interval == 0
            if saved:
                self.save()
            if not done and ctx.stop.agree():
                if not saved:
                    self.save()
                stopped = True
                ctx.log(f"stop requested at step {self.step}; saved")
                break
        if self.is_leader:
            protocol.put(self.bridge.store, protocol.control_key(self.rollouts.next_generated),
                         "stop" if stopped else "done")
            if stopped:
                # The job's global rank 0 is an inference rank; the learner's leader asks instead.
                ctx.requeue(f"{ctx.stop.signal_name or 'signal'} at RL step {self.step}: time limit or preemption")
            plot_loss_curve(ctx.run_dir, title=f"rlvr {self.cfg.run.name}")
        return self.finish({"step": self.step, "stopped": stopped, "last": last})

    def finish(self, result: dict) -> dict:
        self._await_send()
        if self._sender is not None:
            self._sender.close()
        if self.scorer is not None:
            self.scorer.close()
        close_training_world(self.metrics)
        return result


def run(ctx) -> dict:
    with ctx.phase("setup", 0):
        learner = build_learner(ctx)
    return learner.run()
