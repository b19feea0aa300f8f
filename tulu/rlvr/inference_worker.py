"""An inference rank of an RLVR job: hold an engine, take new weights, generate.

Each step's control names the weights version that generates it (`tulu.rlvr.rollout_schedule`);
the rank receives that version unless it already holds it. The first control of an attempt always
names a version the engine does not hold yet, so the first rollout after a start or a resume uses
the learner's (the checkpoint's) weights, never the folder the engine was started from.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from tulu.rlvr import protocol, scoring
from tulu.rlvr.background import Background
from tulu.rlvr.prompts import PromptSet, prompt_files, read_rows


def engine_model_dir(ctx, source) -> Path:
    """A HF folder the engine can start from. Its weights are replaced by the first sync, so a
    tiny or checkpoint-born model gets a seeded random init written once per run."""
    cfg = ctx.cfg
    if cfg.model.name_or_path and source.init.__class__.__name__ == "HFWeights":
        from tulu.models.hub import local_model_folder

        return local_model_folder(cfg.model.name_or_path)   # a hub id: the cached snapshot
    out = ctx.run_dir / "inference_model"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaForCausalLM

    tmp = ctx.run_dir / f".inference_model.{os.getpid()}.tmp"
    torch.manual_seed(cfg.run.seed)
    model = LlamaForCausalLM(source.hf_config)
    model.save_pretrained(tmp)
    if source.tokenizer == "tiny":
        from tulu.data import save_tiny_tokenizer

        save_tiny_tokenizer(tmp)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source.tokenizer).save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another inference rank won the race; its folder is the same
        from tulu.deletion import remove_tree

        remove_tree(tmp, ignore_errors=True)
    return out


def _score(scorer, prompts, responses, tokenizer):
    return scoring.score(scorer, scoring.rows(prompts, responses, tokenizer))


def run(ctx) -> dict:
    from tulu.dist import groups as tdist
    from tulu.inference.engine import SamplingSettings, make_engine
    from tulu.train.data import build_tokenizer
    from tulu.train.model import resolve_model
    from tulu.dist.weight_sync import SyncStats, receive_weights

    cfg, plan, role = ctx.cfg, ctx.plan, ctx.role
    rl, inf = cfg.rlvr, cfg.groups.inference
    with ctx.phase("setup", 0):
        # The engine is built before meeting the learner at the bridge: the learner builds its
        # model meanwhile, so start-up costs the slower of the two, not their sum.
        source = resolve_model(cfg.model, cfg.run.seed)
        tokenizer = build_tokenizer(source.tokenizer)
        train_file, _ = prompt_files(cfg)
        prompts = PromptSet(read_rows(train_file, cfg.data.split, cfg.data.cache_dir), tokenizer,
                            cfg.data.shuffle_seed, inf.max_model_len - rl.response_length)
        model_dir = engine_model_dir(ctx, source)
        if inf.tp * inf.pp > 1:  # vLLM's external launcher picks cuda:LOCAL_RANK itself
            os.environ.update(tdist.engine_env(plan, role, ctx.env))
        else:
            gpu = tdist.bind_task_gpu(ctx.env)
            ctx.log(f"single-GPU engine on GPU {gpu} (CUDA_VISIBLE_DEVICES)" if gpu is not None
                    else "single-GPU engine: no GPU visible")
        # An fp32 policy samples in fp32: vLLM's "auto" picks bf16 on CPU, which is several times
        # slower there and moves the engine's log-probs away from the trainer's (sampler_kl).
        engine = make_engine(inf.engine, model_dir, tp=inf.tp, pp=inf.pp,
                             gpu_memory_utilization=inf.gpu_memory_utilization if tdist.backend() == "nccl" else None,
                             max_model_len=inf.max_model_len, seed=cfg.run.seed,
                             dtype="float32" if cfg.model.dtype == "fp32" else "auto")
        engine_index, engines = role.dp_rank, plan.inference_engines
        reports = role.tp_rank == 0 and role.pp_rank == 0
        # the reporting rank scores its completions (rlvr.score_on), in a thread beside the reference
        # pass; its verifier workers start while the learner builds its model
        scorer = scoring.build_scorer(rl, (p.dataset for p in prompts.prompts)) \
            if reports and rl.score_on == "engine" else None
        scorer_thread = Background("score") if scorer is not None else None
        bridge = tdist.BridgeGroup.for_role(plan, role, ctx.env, timeout_s=cfg.monitoring.collective_timeout_s)
        if rl.reference_in_engine:  # the learner sends it first thing (protocol.REFERENCE_VERSION)
            engine.load_reference(receive_weights(bridge, version=protocol.REFERENCE_VERSION))
    step = protocol.get(bridge.store, protocol.START)
    ctx.log(f"inference engine {engine_index}/{engines} ({inf.engine}, TP{inf.tp} PP{inf.pp}) ready; first step {step}")
    generated, loaded, versions = 0, None, []
    while True:
        control = protocol.get(bridge.store, protocol.control_key(step))
        if not isinstance(control, dict) or control.get("action") != "go":
            ctx.log(f"learner says {control!r} at step {step}")
            break
        version = control["weights"]
        cpu0 = time.process_time()
        sync_s, n_loaded, sync_bytes = 0.0, 0, 0
        if version != loaded:
            ctx.fault_point("weight_sync", step)
            with ctx.phase("weight_sync", step):
                t0 = time.perf_counter()
                stats = SyncStats()
                # routed: a pipeline stage of a PP engine receives only the tensors it holds
                n_loaded = engine.update_weights(receive_weights(bridge, version=version, stats=stats,
                                                                 holds=engine.held_weights(),
                                                                 streams=rl.weight_sync_streams))
                sync_s, sync_bytes, loaded = time.perf_counter() - t0, stats.bytes, version
        mine = prompts.for_step(step, rl.prompts_per_step)[engine_index::engines]
        ctx.fault_point("generate", step)
        with ctx.phase("generate", step):
            t0 = time.perf_counter()
            sampling = SamplingSettings(temperature=rl.temperature, max_new_tokens=rl.response_length,
                                        seed=cfg.run.seed * 100_003 + step, stop_token_ids=(tokenizer.eos_token_id,))
            outs = engine.generate([p.token_ids for p in mine], n=rl.samples_per_prompt, sampling=sampling)
            gen_s = time.perf_counter() - t0
            scored = None if scorer is None else scorer_thread.submit(functools.partial(
                _score, scorer, [mine[o.prompt_index] for o in outs], [o.token_ids for o in outs], tokenizer))
            refs = engine.reference_logprobs([p.token_ids for p in mine], outs, rl.temperature) \
                if rl.reference_in_engine else [None] * len(outs)
            ref_s = time.perf_counter() - t0 - gen_s
            if scored is not None:
                results, score_errors = scored.result()
                score_s = time.perf_counter() - t0 - gen_s - ref_s
        generated += sum(len(o.token_ids) for o in outs)
        versions.append([step, loaded])
        if reports:
            payload = {} if scored is None else {"scores": scoring.encode(results), "score_errors": score_errors,
                                                 "score_wait_s": score_s}
            protocol.put(bridge.store, protocol.rollout_key(step, engine_index), {
                **payload,
                "prompts": [p.index for p in mine],
                "completions": [[o.prompt_index, o.sample_index, o.token_ids, o.logprobs, o.finish_reason, ref]
                                for o, ref in zip(outs, refs)],
                "policy_version": loaded,
                "weight_sync_s": sync_s, "weights": n_loaded, "sync_bytes": sync_bytes, "generate_s": gen_s,
                "reference_s": ref_s,
                # this process's CPU time for the sync + generation (host-bound or not, at a glance)
                "engine_cpu_s": time.process_time() - cpu0,
                "stop_requested": ctx.stop.requested,
            })
        ctx.step_done(step + 1)
        step += 1
    engine.close()
    if scorer is not None:
        scorer_thread.close()
        scorer.close()
    # (step, weights version) of every rollout this rank generated: what tests check the schedule by
    return {"steps_generated_until": step, "tokens_generated": generated, "rollout_versions": versions}
