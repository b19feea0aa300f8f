"""PPO's value model: the policy's Llama as a Megatron ``GPTModel`` whose vocabulary output layer
is replaced by a scalar head (hidden -> 1), trained with its own Megatron optimizer, and saved
in the same checkpoint as the policy.

Initial weights: the policy's initial weights (``model.value_model`` unset), or the weights of
``model.value_model`` when it names a HF checkpoint or a tulu checkpoint folder (it must share
the policy's tokenizer; any Llama shape that the pipeline split allows). A named architecture
(``llama-8b``) has no weights and is refused. The head is seeded per run (normal(0,
initializer_range)), so every TP/PP layout starts from the same values. It has no bias, like HF's
``LlamaForSequenceClassification.score``; a bf16 bias would sit in the no-weight-decay group next
to the fp32 norms, and megatron-core 0.16's bf16 optimizers then pair optimizer state with the
wrong parameters when checkpointing (seen on an H200: "Optimizer shape (32,) does not match
model shape (1,)").

The head is a plain, *replicated* linear layer on the last pipeline stage. Without sequence
parallelism the final norm's output is replicated across the TP ranks, so every TP rank computes
the same values and the same head gradients, and the gradient it sends into the decoder is
already the full one (the vocabulary layer's ``copy_to_tensor_model_parallel_region`` all-reduce
exists because each TP rank holds only part of the vocabulary; a replicated head has nothing to
sum). Megatron counts such a parameter once in the gradient norm, as it does the norms. With
sequence parallelism (the value model follows ``groups.training.sequence_parallel`` like the
policy) the final hidden states arrive split along the sequence across the TP ranks: the head
first gathers the whole sequence, so it stays replicated as above, and its backward hands each
rank the gradient of its own slice (``tensor_parallel_output_grad=False``: every rank computed
the same values, there is nothing to sum). The final norm's weight gradient is a per-slice
partial sum, summed over TP by ``finalize_model_grads`` (``tulu.models.norm``).

Checkpoint: :class:`PolicyAndValueState` hands the checkpoint manager one model (the policy's
sharded state dict, keys unchanged, plus the value model's under ``value.``) and one optimizer
(both Megatron optimizers, nested under ``policy``/``value``), so one ``step_N/manifest.json``
commits both or neither, and a policy-only reader (``tulu export``, a later stage's
``StageCheckpoint``) still loads the policy, ignoring the ``value.`` keys.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import torch
from torch import nn

from tulu.checkpoint.sharded import OPTIMIZER_METADATA
from tulu.config.job import ConfigError
from tulu.train.model import Policy

VALUE_PREFIX = "value."


class ValueHead(nn.Module):
    """hidden [s, b, h] -> values [s, b, 1] (no bias), replicated on every TP rank. Called where
    GPTModel calls its output layer (``weight=`` and ``runtime_gather_output=`` are the vocabulary
    layer's arguments and are ignored); computed in fp32 whatever the parameter dtype."""

    def __init__(self, hidden_size: int, *, dtype: torch.dtype, std: float, seed: int,
                 gather_sequence: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"value_head"))
        self.weight = nn.Parameter((torch.randn(1, hidden_size, generator=g) * std).to(dtype))
        self.gather_sequence = gather_sequence  # sequence parallel: hidden is this rank's slice
        self.sequence_parallel = False  # read by GPTModel's inference path only: we gather ourselves

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.gather_sequence:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        values = torch.nn.functional.linear(hidden.float(), self.weight.float())
        return values, None


def attach_value_head(model, hf_config, seed: int) -> None:
    """Replace ``model.output_layer`` (last stage only) by a :class:`ValueHead`."""
    if not model.post_process:
        return
    dtype = model.config.params_dtype  # the linear layers' dtype (the norms' may differ)
    device = next(model.parameters()).device
    head = ValueHead(hf_config.hidden_size, dtype=dtype, std=hf_config.initializer_range, seed=seed,
                     gather_sequence=model.config.sequence_parallel)
    model.output_layer = head.to(device)


def value_source(cfg, policy_source):
    """Where the value model's architecture and initial weights come from (see the module doc)."""
    from tulu.train import model as tmodel

    vm = cfg.model.value_model
    if vm is None:
        source = policy_source
    else:
        source = tmodel.resolve_model(dataclasses.replace(cfg.model, name_or_path=vm, arch=None, tiny=None,
                                                          value_model=None), cfg.run.seed)
        if source.hf_config.vocab_size != policy_source.hf_config.vocab_size:
            raise ConfigError("model.value_model", f"{vm!r} has a vocabulary of {source.hf_config.vocab_size}, "
                              f"the policy {policy_source.hf_config.vocab_size}; the value model reads the "
                              "policy's tokens, so it needs the same tokenizer")
    if source.init is None:
        raise ConfigError("model.value_model" if vm else "model.arch",
                          "the PPO value model needs initial weights: give model.name_or_path or model.tiny "
                          "(or model.value_model as a HF or tulu checkpoint); a named architecture has none")
    return source


# The value model's trained parts are the policy's: module, DDP wrapper, Megatron optimizer.
ValueModel = Policy


def value_lr(rl_cfg) -> float:
    return rl_cfg.value_lr if rl_cfg.value_lr is not None else rl_cfg.optim.lr


def build_value_model(cfg, policy_source) -> ValueModel:
    """This rank's shard of the value model in Megatron DDP with its own optimizer
    (``rlvr.value_lr``, default the policy's lr; the policy's other optimizer settings)."""
    from tulu.train import model as tmodel

    source = value_source(cfg, policy_source)
    module = tmodel.build_gpt(source, cfg.model, cfg.groups.training, cfg.run.seed)
    attach_value_head(module, source.hf_config, cfg.run.seed)
    return tmodel.wrap_for_training(cfg, module, source.hf_config, lr=value_lr(cfg.stage_config), min_lr=0.0)


# --- one checkpoint for both ---------------------------------------------------------------------



class _JointOptimizer:
    """Both Megatron optimizers as one for the checkpoint manager (``sharded_state_dict`` against
    the joint model state). The value optimizer's checkpoint keys get the ``value.`` prefix: the
    distributed optimizer names some of its state by its DP group, not by parameter, so the two
    would otherwise collide; the policy optimizer's keys stay those of a GRPO checkpoint."""

    def __init__(self, policy_opt, value_opt):
        self.parts = {"policy": policy_opt, "value": value_opt}
        # Megatron's name for "the optimizers this one is made of": tulu.checkpoint.sharded looks
        # inside for distributed optimizers whose Adam state must be prepared before a load.
        self.chained_optimizers = [policy_opt, value_opt]

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

        kwargs.setdefault("metadata", dict(OPTIMIZER_METADATA))
        out = {}
        for name, opt in self.parts.items():
            out[name] = opt.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, **kwargs)
            if name == "value":
                add_prefix_for_sharding(out[name], VALUE_PREFIX)
        return out

    def load_state_dict(self, state_dict) -> None:
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])


class PolicyAndValueState:
    """The policy and the value model as the one model + one optimizer a checkpoint holds.

        ckpt.save(step, state, optimizer=state.optimizer, ...)
        loaded = ckpt.load(state, optimizer=state.optimizer, ...)
        if loaded is not None: state.restore(loaded.model_state)
    """

    def __init__(self, policy, value: ValueModel):
        self.policy_module, self.value_module = policy.module, value.module
        self.optimizer = _JointOptimizer(policy.optimizer, value.optimizer)

    def sharded_state_dict(self) -> dict:
        sd = dict(self.policy_module.sharded_state_dict())
        value_sd = self.value_module.sharded_state_dict(prefix=VALUE_PREFIX)
        clash = sd.keys() & value_sd.keys()
        if clash:
            raise RuntimeError(f"policy and value checkpoint keys collide: {sorted(clash)[:3]}")
        sd.update(value_sd)
        return sd

    def restore(self, loaded: dict) -> None:
        """Load the dict the manager read (``LoadedCheckpoint.model_state``) into both modules."""
        n = len(VALUE_PREFIX)
        self.policy_module.load_state_dict({k: v for k, v in loaded.items() if not k.startswith(VALUE_PREFIX)})
        self.value_module.load_state_dict({k[n:]: v for k, v in loaded.items() if k.startswith(VALUE_PREFIX)})
