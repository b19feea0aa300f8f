"""The model a training rank holds: its TP/PP shard of the policy (Megatron ``GPTModel`` in
Megatron's DDP wrapper, with Megatron's optimizer), and for DPO a frozen reference.

Initial weights, chosen once from ``model``:

- ``name_or_path``: a Hugging Face checkpoint's weights (``*.safetensors``, read lazily: a
  rank reads only the tensors of its stage), or a tulu checkpoint folder of an earlier stage
  (DPO from the SFT run: ``model.name_or_path: runs/<sft>/checkpoints``), whose architecture and
  tokenizer are recorded in its ``extra_state``;
- ``tiny``: a seeded init computed per *HF tensor name* (normal(0, initializer_range) for
  matrices, ones for norms), so every TP/PP layout starts from the same full weights;
- ``arch``: Megatron's own seeded init (differs between layouts; for shape tests only).

Settings made here, once, the same on CPU and GPU: parameter dtype (``model.dtype``);
sequence parallelism (``groups.training.sequence_parallel``, with TP > 1; its norms are
``tulu.models.norm.RMSNorm``); Megatron's distributed optimizer
(``groups.training.distributed_optimizer``; on CPU through ``tulu.models.megatron_cpu``'s
redirects, its checkpoints through ``tulu.checkpoint.sharded``); the dtype gradients are reduced
in (``groups.training.grad_dtype``); gradient clipping by Megatron's optimizer.
Losses are summed per micro-batch and Megatron divides the gradients by the number of loss
units (tokens for SFT, pairs for DPO) of the whole global batch (``calculate_per_token_loss``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tulu.checkpoint.stage import StageCheckpoint  # noqa: F401  (its home; importable here too)


# --- where the model comes from ------------------------------------------------------------------

TINY_TOKENIZER = "tiny"  # the project's byte-level tokenizer (tulu.data.build_tiny_tokenizer)


@dataclass
class ModelSource:
    """The architecture (a HF ``LlamaConfig``), the tokenizer (a HF name/path or ``"tiny"``) and
    the initial weights (``init.load_into(model)``; None: Megatron's own init)."""

    hf_config: Any
    tokenizer: str
    init: Any

    def describe(self) -> dict:
        """What a checkpoint records so a later stage can start from it."""
        return {"hf_config": self.hf_config.to_dict(), "tokenizer": self.tokenizer}


def resolve_model(model_cfg, seed: int) -> ModelSource:
    """``model.tiny``: seeded init; ``model.arch``: Megatron's init; ``model.name_or_path``: a HF
    checkpoint, or a tulu checkpoint folder (a run's ``checkpoints/`` or one ``step_N``) of an
    earlier stage, e.g. DPO starting from the SFT run."""
    from tulu.models import llama

    if model_cfg.init_from:
        return _from_earlier_stage(model_cfg, seed)
    if model_cfg.tiny is not None:
        t = model_cfg.tiny
        hf = llama.tiny_llama_config(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, head_dim=t.hidden_size // t.num_attention_heads,
            max_position_embeddings=t.max_position_embeddings, rope_theta=t.rope_theta)
        return ModelSource(hf, model_cfg.tokenizer or TINY_TOKENIZER, HFWeights(SeededInit(hf, seed), hf))
    if model_cfg.arch is not None:
        hf = llama.llama_config_from_preset(model_cfg.arch.replace("llama-", "llama"))
        if model_cfg.tokenizer is None:
            raise ValueError("model.arch has no tokenizer: set model.tokenizer (a HF name or path)")
        return ModelSource(hf, model_cfg.tokenizer, None)
    stage = StageCheckpoint.find(model_cfg.name_or_path)
    if stage is not None:
        from transformers import LlamaConfig

        recorded = stage.model_source()
        return ModelSource(LlamaConfig(**recorded["hf_config"]), model_cfg.tokenizer or recorded["tokenizer"], stage)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_cfg.name_or_path)
    return ModelSource(hf, model_cfg.tokenizer or model_cfg.name_or_path,
                       HFWeights(SafetensorsWeights(model_cfg.name_or_path), hf))


def tokenizer_name(model_cfg) -> str | None:
    """The tokenizer `resolve_model` will use, found without building or loading anything (for
    the data preparation at submit time); None while an earlier stage's checkpoint is missing."""
    if model_cfg.tokenizer:
        return model_cfg.tokenizer
    if model_cfg.init_from or model_cfg.name_or_path:
        stage = StageCheckpoint.find(model_cfg.init_from or model_cfg.name_or_path)
        if stage is not None:
            return stage.model_source()["tokenizer"]
        return None if model_cfg.init_from else model_cfg.name_or_path
    return TINY_TOKENIZER if model_cfg.tiny is not None else None


def _from_earlier_stage(model_cfg, seed: int) -> ModelSource:
    """``model.init_from``: the declared architecture, the earlier stage's weights and tokenizer."""
    import dataclasses

    from transformers import LlamaConfig

    from tulu.config.job import ConfigError
    from tulu.config.shapes import resolve_shape, shape_from_hf_config

    stage = StageCheckpoint.find(model_cfg.init_from)
    if stage is None:
        raise ConfigError("model.init_from", f"got {model_cfg.init_from!r}; no verified tulu checkpoint there "
                          "(expected a run's checkpoints/ folder or one step_N with manifest.json)")
    recorded = stage.model_source()
    declared = resolve_shape(dataclasses.replace(model_cfg, init_from=None))
    found = shape_from_hf_config(str(stage.path), recorded["hf_config"])
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(declared, f) != getattr(found, f):
            raise ConfigError("model.init_from", f"{stage.path} has {f}={getattr(found, f)} but the config "
                              f"declares {getattr(declared, f)}; make the model section match the earlier stage")
    return ModelSource(LlamaConfig(**recorded["hf_config"]), model_cfg.tokenizer or recorded["tokenizer"], stage)


def torch_dtype(model_cfg) -> torch.dtype:
    return torch.bfloat16 if model_cfg.dtype == "bf16" else torch.float32


# --- initial weights -----------------------------------------------------------------------------

class SeededInit(Mapping):
    """A lazy full HF state dict of random weights: each tensor is drawn from a generator seeded
    by (seed, tensor name), so it does not depend on which rank asks or in which order."""

    def __init__(self, hf_config, seed: int):
        self.cfg, self.seed = hf_config, seed
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        h, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
        q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        self.shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            self.shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            })

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * self.cfg.initializer_range

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class SafetensorsWeights(Mapping):
    """The tensors of a HF checkpoint folder (or hub name), opened lazily from ``*.safetensors``."""

    def __init__(self, name_or_path: str):
        from safetensors import safe_open

        folder = Path(name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"model.name_or_path={name_or_path!r}: no *.safetensors in {folder}")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), "pt") as fh:
                self._where.update({k: f for k in fh.keys()})
        self._open = safe_open

    def __getitem__(self, name: str) -> torch.Tensor:
        with self._open(str(self._where[name]), "pt") as fh:
            return fh.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass
class HFWeights:
    """Full HF-named tensors (a lazy mapping) copied into this rank's shard."""

    tensors: Mapping
    hf_config: Any

    def load_into(self, model) -> None:
        from tulu.models.convert import hf_state_dict_to_megatron

        hf_state_dict_to_megatron(self.tensors, self.hf_config, model)


# --- building ------------------------------------------------------------------------------------

def _transformer_overrides(training_cfg) -> dict:
    """TransformerConfig settings of the training group (recompute, sequence parallel)."""
    out: dict[str, Any] = {"calculate_per_token_loss": True}
    if training_cfg.recompute == "selective":
        out["recompute_granularity"] = "selective"
    elif training_cfg.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if training_cfg.sequence_parallel and training_cfg.tp > 1:  # Megatron refuses it at TP1
        out["sequence_parallel"] = True
    return out


def build_gpt(source: ModelSource, model_cfg, training_cfg, seed: int):
    """This rank's shard of a GPTModel with the source's initial weights."""
    from tulu.models.llama import build_gpt_model

    model = build_gpt_model(source.hf_config, dtype=torch_dtype(model_cfg), seed=seed,
                            **_transformer_overrides(training_cfg))
    if source.init is not None:
        source.init.load_into(model)
    return model


def ddp_config(training_cfg):
    """Megatron's DDP settings from ``groups.training``: gradients reduced (and kept) in fp32 or
    in the parameters' dtype (``grad_dtype: bf16``, half the gradient memory the plan counts), the
    distributed optimizer's reduce-scatter or the replicated optimizer's all-reduce. No overlap
    of the reduction with the backward pass: it needs CUDA streams."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(grad_reduce_in_fp32=training_cfg.grad_dtype == "fp32",
                                         use_distributed_optimizer=training_cfg.distributed_optimizer,
                                         overlap_grad_reduce=False)


@dataclass
class Policy:
    """The trained model: ``module`` (GPTModel shard), ``ddp`` (what the schedule runs),
    ``optimizer`` (Megatron's, with clipping)."""

    module: Any
    ddp: Any
    optimizer: Any
    hf_config: Any

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def build_policy(cfg, source: ModelSource) -> Policy:
    optim = cfg.stage_config.optim
    module = build_gpt(source, cfg.model, cfg.groups.training, cfg.run.seed)
    return wrap_for_training(cfg, module, source.hf_config, lr=optim.lr, min_lr=optim.min_lr)


def wrap_for_training(cfg, module, hf_config, *, lr: float, min_lr: float) -> Policy:
    """``module`` in Megatron's DDP wrapper (:func:`ddp_config`) with Megatron's Adam (clipping
    from the stage's optim), distributed over DP or replicated as ``groups.training`` says. Used
    for the policy and for PPO's value model."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optim = cfg.stage_config.optim
    dtype = torch_dtype(cfg.model)
    ddp_cfg = ddp_config(cfg.groups.training)
    dist_opt = ddp_cfg.use_distributed_optimizer
    ddp = DistributedDataParallel(module.config, ddp_cfg, module)
    module.config.finalize_model_grads_func = finalize_model_grads
    module.config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=optim.weight_decay,
                        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                        clip_grad=optim.grad_clip, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                        use_distributed_optimizer=dist_opt),
        [ddp])
    if not torch.cuda.is_available():
        _fuse_cpu_adam(optimizer)
    return Policy(module, ddp, optimizer, hf_config)


class FusedCPUAdamW(torch.optim.AdamW):
    """torch's AdamW (Megatron's Adam without Apex or Transformer Engine) taking its step with the
    fused CPU kernel where every parameter of a group is on the CPU: one pass over all of them
    instead of ~10 ops per tensor (the 0.9M-parameter default: 2.2 -> 0.85 ms a step, a few
    percent of an RL step). Set at step time, so a group loaded from a checkpoint saved without
    it is fused as well."""

    def step(self, closure=None):
        for group in self.param_groups:
            if group.get("fused") is None and not group.get("foreach") and not group.get("differentiable") \
                    and all(p.device.type == "cpu" for p in group["params"]):
                group["fused"] = True
        return super().step(closure)


def _fuse_cpu_adam(optimizer) -> None:
    """Megatron's torch AdamW (its fallback picks the class itself) steps as :class:`FusedCPUAdamW`."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if type(inner) is torch.optim.AdamW:
            inner.__class__ = FusedCPUAdamW


def build_reference(cfg, source: ModelSource):
    """The frozen reference for DPO: the policy's initial weights, no gradients, eval mode."""
    if source.init is None:
        raise ValueError("a DPO reference model needs reproducible initial weights: give model.name_or_path "
                         "or model.tiny (model.arch uses Megatron's layout-dependent init)")
    ref = build_gpt(source, cfg.model, cfg.groups.training, cfg.run.seed)
    ref.requires_grad_(False)
    ref.eval()
    return ref
