"""The training loop of a `train` job (SFT or DPO), from an empty process to the final eval.

    setup: role world, Megatron groups, data, policy (+ reference), LR schedule, resume
    eval at step 0 (fresh runs)
    per step: fault point -> train step -> metrics -> eval (every eval_interval, and at the end)
              -> checkpoint (every checkpoint.interval, and at the end) -> stop agreement
    on a stop (all ranks agree at the step boundary): save, global rank 0 asks for a requeue, exit

Resume is exact under the same layout: model, optimizer (Adam moments and step), LR schedule
step, per-rank RNG states and the data position come back from the newest verified
checkpoint, so the resumed run computes bit-for-bit the losses the uninterrupted run computes
(on CPU; on GPUs only as deterministic as the kernels). Under another TP/PP layout the weights
and optimizer state reshard and the data position holds; the losses then agree within float
rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch.distributed as dist

from tulu.atomic import write_json_atomic
from tulu.config.job import ConfigError
from tulu.train.world import close_training_world, form_training_world


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch of ``units`` (sequences for SFT, pairs for DPO) is split."""

    global_units: int
    dp: int
    micro_units: int
    num_micro: int

    @property
    def rank_units(self) -> int:
        return self.micro_units * self.num_micro

    @classmethod
    def of(cls, cfg, dp: int) -> "BatchLayout":
        gbs, mbs = cfg.stage_config.global_batch_size, cfg.groups.training.micro_batch_size
        if gbs % (mbs * dp):
            raise ConfigError(f"{cfg.stage}.global_batch_size",
                              f"got {gbs}; must be a multiple of groups.training.micro_batch_size ({mbs}) "
                              f"x data-parallel size ({dp}) = {mbs * dp}")
        return cls(gbs, dp, mbs, gbs // (mbs * dp))


class Trainer:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.st = ctx.cfg.stage_config
        self.is_writer = ctx.role.role_rank == 0
        self.metrics = None
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from tulu.checkpoint import CheckpointManager, fingerprint
        from tulu.data import BatchLoader
        from tulu.train import model as tmodel
        from tulu.train.data import load_stage_data
        from tulu.train.metrics import MetricsLog
        from tulu.train.objectives import DPOObjective, SFTObjective
        from tulu.train.schedule import LRSchedule

        cfg, ctx, st = self.cfg, self.ctx, self.st
        dp, dp_rank = form_training_world(ctx)
        self.layout = BatchLayout.of(cfg, dp)
        self.seq_length = st.max_seq_len

        self.source = tmodel.resolve_model(cfg.model, cfg.run.seed)
        hf_config = self.source.hf_config
        eval_size = max(256, 4 * self.layout.global_units)
        self.data = load_stage_data(cfg, self.source.tokenizer, is_leader=ctx.role.role_rank == 0,
                                    barrier=dist.barrier, eval_size=eval_size)
        if len(self.data.tokenizer) > hf_config.vocab_size:
            raise ConfigError("model.tiny.vocab_size" if cfg.model.tiny else "model",
                              f"the model's vocabulary ({hf_config.vocab_size}) is smaller than the "
                              f"tokenizer's ({len(self.data.tokenizer)})")

        self.policy = tmodel.build_policy(cfg, self.source)
        if cfg.stage == "sft":
            self.objective = SFTObjective(st, self.seq_length, self.layout.num_micro)
        else:
            self.objective = DPOObjective(st, self.seq_length, self.layout.num_micro,
                                          tmodel.build_reference(cfg, self.source))
        pack = cfg.stage == "sft" and st.packing
        self.loader = BatchLoader(self.data.train, batch_size=self.layout.rank_units, seed=cfg.data.shuffle_seed,
                                  dp_rank=dp_rank, dp_size=self.layout.dp, pack=pack)
        self.total_steps = st.max_steps or self.loader.total_steps(st.epochs)
        self.schedule = LRSchedule.from_optim(st.optim, self.total_steps)

        self.ckpt = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                                      config_fingerprint=fingerprint(cfg))
        self.step = 0
        if cfg.checkpoint.load:
            loaded = self.ckpt.load(self.policy.module, optimizer=self.policy.optimizer,
                                    lr_scheduler=self.schedule)
            if loaded is not None:
                self.step = loaded.step
                self.loader.load_state_dict(loaded.data_state)
                ctx.log(f"resumed from {loaded.path} at step {loaded.step}"
                        + (f" (resharded from {loaded.manifest.layout})" if loaded.resharded else "")
                        + (f"; not restored: {loaded.not_restored}" if loaded.not_restored else ""))
        if self.is_writer:
            self.metrics = MetricsLog(ctx.run_dir, log=ctx.log)
            self.metrics.truncate_after(self.step)
            # The checkpoint folder doubles as a model folder for a later stage's planner
            # (`model.name_or_path: runs/<sft>/checkpoints` reads its config.json).
            write_json_atomic(cfg.checkpoint_dir / "config.json", hf_config.to_dict())

        self.eval_batches = []
        if self.data.eval is not None:
            eval_loader = BatchLoader(self.data.eval, batch_size=self.layout.rank_units, seed=0, dp_rank=dp_rank,
                                      dp_size=self.layout.dp, pack=pack, shuffle=False, num_epochs=1)
            self.eval_batches = [self.objective.split(b) for b in eval_loader]
        if cfg.stage == "dpo":
            for mbs in self.eval_batches:
                self.objective.reference_logps(mbs)
            if st.reference_logprobs == "precomputed":
                self.objective.precompute(self._planned_batches())
        ctx.log(f"{cfg.stage}: {self.total_steps} steps, global batch {self.layout.global_units} = "
                f"micro-batch {self.layout.micro_units} x {self.layout.num_micro} micro-batches x DP{self.layout.dp} "
                f"(TP{ctx.plan.training_tp} PP{ctx.plan.training_pp}), {len(self.data.train)} training samples, "
                f"{len(self.eval_batches)} held-out batches; starting at step {self.step}")

    def _planned_batches(self):
        """(micro-batches, pair indices) of every step this rank has left, without moving the loader."""
        from tulu.data import BatchLoader

        probe = BatchLoader(self.data.train, batch_size=self.layout.rank_units, seed=self.cfg.data.shuffle_seed,
                            dp_rank=self.loader.dp_rank, dp_size=self.layout.dp, state=self.loader.state)
        it = iter(probe)
        for _ in range(self.step, self.total_steps):
            indices = [row[0] for row in probe.rows_at(probe.state)]
            yield self.objective.split(next(it)), indices

    # ------------------------------------------------------------------ pieces of a step
    def _loss_fn(self, mb, output):
        loss, units, sums = self.objective.loss_fn(mb, output)
        sums["real_tokens"] = float(mb["real_tokens"])
        return loss, units, sums

    def train_one_step(self) -> dict[str, float]:
        from tulu.train.step import reduce_sums, train_step

        t0 = time.perf_counter()
        indices = [row[0] for row in self.loader.rows_at(self.loader.state)] if self.cfg.stage == "dpo" else None
        microbatches = self.objective.split(next(self._batches))
        self.objective.prepare(microbatches, indices)
        lr = self.schedule.current_lr
        stores, grad_norm = train_step(self.policy, microbatches, self._loss_fn, lr=lr, seq_length=self.seq_length)
        sums = reduce_sums(stores, (*self.objective.keys, "real_tokens"))
        self.schedule.advance()
        elapsed = time.perf_counter() - t0
        return {**self.objective.metrics(sums), "grad_norm": grad_norm, "lr": lr,
                "tokens": int(sums["real_tokens"]), "tokens_per_s": sums["real_tokens"] / elapsed,
                "step_time_s": elapsed}

    def evaluate(self) -> dict[str, float] | None:
        if not self.eval_batches:
            return None
        with self.ctx.phase("eval", self.step):
            result = self.objective.evaluate(self.policy, self.eval_batches)
        if self.metrics:
            self.metrics.write("eval", self.step, result)
        return result

    def save(self) -> None:
        self.ctx.fault_point("checkpoint", self.step)
        with self.ctx.phase("checkpoint", self.step):
            path = self.ckpt.save(self.step, self.policy.module, optimizer=self.policy.optimizer,
                                  lr_scheduler=self.schedule, data_state=self.loader.state_dict(),
                                  extra_state={"model_source": self.source.describe()})
        self.ctx.log(f"checkpoint step {self.step} saved to {path} "
                     f"({self.ckpt.last_save_stats.get('total_s', 0):.2f} s)")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        ctx, cfg = self.ctx, self.cfg
        with ctx.phase("setup", 0):
            self.setup()
        result: dict = {"start_step": self.step}
        if self.step == 0:
            result["eval_start"] = self.evaluate()
        self._batches = iter(self.loader)
        eval_interval = getattr(self.st, "eval_interval", 0)
        last: dict = {}
        while self.step < self.total_steps:
            ctx.fault_point("train", self.step)
            with ctx.phase("train", self.step):
                last = self.train_one_step()
            self.step += 1
            ctx.step_done(self.step)
            if self.metrics and (self.step % self.st.log_interval == 0 or self.step == self.total_steps):
                self.metrics.write("train", self.step, last)
            done = self.step == self.total_steps
            if done or (eval_interval and self.step % eval_interval == 0):
                result["eval_end" if done else "eval_last"] = self.evaluate()
            saved = done or self.step % cfg.checkpoint.interval == 0
            if saved:
                self.save()
            if not done and ctx.stop.agree():
                if not saved:
                    self.save()
                ctx.log(f"stop requested ({ctx.stop.signal_name or 'by another rank'}) at step {self.step}; saved")
                if ctx.is_global_leader:
                    ctx.requeue(f"{ctx.stop.signal_name or 'signal'} at step {self.step}: time limit or preemption")
                return self.finish({**result, "stopped_at": self.step, "last": last})
        if self.metrics:
            from tulu.train.metrics import plot_loss_curve

            plot_loss_curve(ctx.run_dir, title=f"{cfg.stage} {cfg.run.name}")
        return self.finish({**result, "step": self.step, "last": last})

    def finish(self, result: dict) -> dict:
        close_training_world(self.metrics)
        return result


def train(ctx) -> dict:
    return Trainer(ctx).run()
