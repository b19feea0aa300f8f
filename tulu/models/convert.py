"""Hugging Face Llama <-> Megatron-core ``GPTModel`` (local spec) weights, for any TP/PP split.

Name and layout mapping, for global layer ``L`` (HF) held as local layer ``l`` by its stage
(Megatron numbers each stage's layers from 0; ``TransformerLayer.layer_number`` is global):

==================================================  ==============================================
Megatron (this rank's shard)                        Hugging Face (full tensor); how it is split
==================================================  ==============================================
embedding.word_embeddings.weight  [Vp/tp, H]        model.embed_tokens.weight [V, H]; rows
decoder.layers.l.input_layernorm.weight             model.layers.L.input_layernorm.weight
decoder.layers.l.self_attention.linear_qkv.weight   model.layers.L.self_attn.{q,k,v}_proj.weight
decoder.layers.l.self_attention.linear_proj.weight  model.layers.L.self_attn.o_proj.weight; cols
decoder.layers.l.pre_mlp_layernorm.weight           model.layers.L.post_attention_layernorm.weight
decoder.layers.l.mlp.linear_fc1.weight              model.layers.L.mlp.{gate,up}_proj.weight; rows
decoder.layers.l.mlp.linear_fc2.weight              model.layers.L.mlp.down_proj.weight; cols
decoder.final_layernorm.weight                      model.norm.weight
output_layer.weight  [Vp/tp, H]                     lm_head.weight [V, H]; rows
==================================================  ==============================================

* ``linear_qkv`` is grouped by KV head: for each query group ``g`` (``ng`` = KV heads,
  ``hpg`` = query heads per group) the rows are ``[q heads g*hpg .. g*hpg+hpg-1, k_g, v_g]``,
  each ``head_dim`` rows; tensor parallelism gives each rank ``ng/tp`` whole groups. This is the
  GQA pairing HF uses too (query head ``j`` reads KV head ``j // hpg``). Biases
  (``attention_bias=True``) follow the same layout.
* ``linear_fc1`` holds ``[gate shard; up shard]`` per TP rank (Megatron splits the fused
  weight in halves after the matmul), not ``[gate; up]`` of the full matrices.
* The vocabulary is padded to ``model.vocab_size`` (a multiple of TP; see
  ``tulu.models.llama.padded_vocab_size``): import fills padding rows with zeros, export drops
  them. The model's logits then have ``Vp`` columns, the padding ones 0: take
  ``logits[..., :V]`` before a softmax (no padding for Llama 3's 128256 at power-of-two TP).

Written by hand rather than with nvidia-modelopt's ``import_mcore_gpt_from_hf`` /
``export_mcore_gpt_to_hf``: those read and write checkpoint folders on disk, while training
needs in-memory state dicts and a per-tensor stream for weight sync (``iter_hf_weights``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["hf_state_dict_to_megatron", "hf_weight_index", "iter_hf_weights", "megatron_to_hf_state_dict"]


@dataclass(frozen=True)
class _Shapes:
    hidden: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    tp: int
    tp_rank: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


def _shapes(hf_config) -> _Shapes:
    from megatron.core import parallel_state as ps

    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    tp = ps.get_tensor_model_parallel_world_size()
    groups = hf_config.num_key_value_heads
    if groups % tp:
        raise ValueError(f"num_key_value_heads={groups} must be divisible by TP={tp}")
    return _Shapes(hf_config.hidden_size, heads, groups, head_dim, hf_config.vocab_size, tp,
                   ps.get_tensor_model_parallel_rank())


def _strip_prefix(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _local_layers(model) -> dict[int, int]:
    """{local layer index: global 0-based layer index} of this pipeline stage."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


# --- HF -> Megatron -------------------------------------------------------------------------------

def _qkv_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: _Shapes) -> torch.Tensor:
    """Full Megatron linear_qkv (weight [.., H] or bias [..]) grouped [q x hpg, k, v] per group."""
    tail = q.shape[1:]
    q = q.reshape(s.groups, s.heads_per_group * s.head_dim, *tail)
    k = k.reshape(s.groups, s.head_dim, *tail)
    v = v.reshape(s.groups, s.head_dim, *tail)
    return torch.cat([q, k, v], dim=1)  # [ng, (hpg+2)*d, ...]


def _megatron_shard(mname: str, layer_of: dict[int, int], hf: Mapping[str, torch.Tensor],
                    s: _Shapes, padded_vocab: int) -> torch.Tensor:
    """The local shard of Megatron tensor ``mname`` computed from the full HF tensors."""
    def get(name: str) -> torch.Tensor:
        try:
            return hf[name]
        except KeyError:
            raise KeyError(
                f"HF state dict has no {name!r} (needed for Megatron {mname!r}); "
                f"it holds {len(hf)} tensors, e.g. {sorted(hf)[:3]}"
            ) from None

    def rows(t: torch.Tensor) -> torch.Tensor:  # column-parallel: split dim 0
        n = t.shape[0] // s.tp
        return t[s.tp_rank * n:(s.tp_rank + 1) * n]

    def cols(t: torch.Tensor) -> torch.Tensor:  # row-parallel: split dim 1
        n = t.shape[1] // s.tp
        return t[:, s.tp_rank * n:(s.tp_rank + 1) * n]

    def vocab_rows(t: torch.Tensor) -> torch.Tensor:
        if padded_vocab > t.shape[0]:
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
        return rows(t)

    if mname == "embedding.word_embeddings.weight":
        return vocab_rows(get("model.embed_tokens.weight"))
    if mname == "output_layer.weight":
        return vocab_rows(get("lm_head.weight"))
    if mname == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    parts = mname.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise KeyError(f"no HF mapping for Megatron tensor {mname!r}")
    local, rest = int(parts[2]), ".".join(parts[3:])
    p = f"model.layers.{layer_of[local]}."
    if rest == "input_layernorm.weight":
        return get(p + "input_layernorm.weight")
    if rest == "pre_mlp_layernorm.weight":
        return get(p + "post_attention_layernorm.weight")
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        full = _qkv_full(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), s)
        n = s.groups // s.tp
        return full[s.tp_rank * n:(s.tp_rank + 1) * n].reshape(-1, *full.shape[2:])
    if rest == "self_attention.linear_proj.weight":
        return cols(get(p + "self_attn.o_proj.weight"))
    if rest == "mlp.linear_fc1.weight":
        gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
        return torch.cat([rows(gate), rows(up)])
    if rest == "mlp.linear_fc2.weight":
        return cols(get(p + "mlp.down_proj.weight"))
    raise KeyError(f"no HF mapping for Megatron tensor {mname!r}")


@torch.no_grad()
def hf_state_dict_to_megatron(hf_sd: Mapping[str, torch.Tensor], hf_config, model) -> None:
    """Copy HF Llama weights into this process's shard of ``model`` (its TP rank, PP stage).

    ``hf_sd``: a full (unsharded) ``LlamaForCausalLM`` state dict; only the tensors of this
    stage are read, so a dict holding just those is enough. Values are copied (cast to the
    model's dtype). Every Megatron tensor must be covered; a missing HF name or a shape mismatch
    raises an error that names the tensor.
    """
    s = _shapes(hf_config)
    model = getattr(model, "module", model)
    layer_of = _local_layers(model)
    padded_vocab = model.vocab_size
    for mname, param in model.state_dict(keep_vars=True).items():
        if mname.endswith("_extra_state") or param is None:
            continue
        shard = _megatron_shard(mname, layer_of, hf_sd, s, padded_vocab)
        if shard.shape != param.shape:
            raise ValueError(
                f"{mname}: HF weights give a TP-rank-{s.tp_rank} shard of shape "
                f"{tuple(shard.shape)}, the model holds {tuple(param.shape)} (config mismatch?)"
            )
        param.copy_(shard)


# --- Megatron -> HF -------------------------------------------------------------------------------

def _gather_tp(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    t = t.detach().contiguous()
    if tp == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(out, t, group=ps.get_tensor_model_parallel_group())
    return out


def _hf_tensors(mname: str, t: torch.Tensor, layer_of: dict[int, int],
                s: _Shapes, copy: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Full HF tensors for the Megatron tensor ``mname`` (collective over the TP group);
    ``copy=False``: views of ``t`` where the HF tensor is a slice of it (module doc of
    :func:`iter_hf_weights`)."""
    def cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return parts[0] if len(parts) == 1 and not copy else torch.cat(parts, dim=dim)

    def alone(x: torch.Tensor) -> torch.Tensor:
        return x.detach().clone() if copy else x.detach()

    if mname in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full = cat(_gather_tp(t, 0))[: s.vocab]
        name = "model.embed_tokens.weight" if mname.startswith("embedding") else "lm_head.weight"
        return [(name, full)]
    if mname == "decoder.final_layernorm.weight":
        return [("model.norm.weight", alone(t))]
    parts = mname.split(".")
    local, rest = int(parts[2]), ".".join(parts[3:])
    p = f"model.layers.{layer_of[local]}."
    if rest == "input_layernorm.weight":
        return [(p + "input_layernorm.weight", alone(t))]
    if rest == "pre_mlp_layernorm.weight":
        return [(p + "post_attention_layernorm.weight", alone(t))]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        full = torch.cat(_gather_tp(t, 0))
        full = full.reshape(s.groups, (s.heads_per_group + 2) * s.head_dim, *full.shape[1:])
        qn = s.heads_per_group * s.head_dim
        q, k, v = full.split([qn, s.head_dim, s.head_dim], dim=1)
        tail = full.shape[2:]
        return [(f"{p}self_attn.q_proj.{kind}", q.reshape(-1, *tail).contiguous()),
                (f"{p}self_attn.k_proj.{kind}", k.reshape(-1, *tail).contiguous()),
                (f"{p}self_attn.v_proj.{kind}", v.reshape(-1, *tail).contiguous())]
    if rest == "self_attention.linear_proj.weight":
        return [(p + "self_attn.o_proj.weight", cat(_gather_tp(t, 1), dim=1))]
    if rest == "mlp.linear_fc1.weight":
        halves = [x.chunk(2, dim=0) for x in _gather_tp(t, 0)]
        return [(p + "mlp.gate_proj.weight", cat([g for g, _ in halves])),
                (p + "mlp.up_proj.weight", cat([u for _, u in halves]))]
    if rest == "mlp.linear_fc2.weight":
        return [(p + "mlp.down_proj.weight", cat(_gather_tp(t, 1), dim=1))]
    raise KeyError(f"no HF mapping for Megatron tensor {mname!r}")


def iter_hf_weights(model, hf_config, *, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for this pipeline stage's weights, one at a time.

    ``copy=False`` (the weight sync, which packs every tensor into its send buffer before the
    optimizer changes the weights): where the HF tensor is the Megatron tensor or a contiguous
    slice of it (norms, embedding, head, o_proj, gate/up and down at TP 1), it is yielded as a view
    of the parameter instead of a copy; q/k/v are copies either way.

    Each tensor is gathered over the tensor-parallel group, so every TP rank of the stage must
    iterate in step (it is a collective); all of them receive the full tensors. Order: embedding
    (first stage), then each layer of the stage in global order (norms, q/k/v/o, gate/up/down),
    then the final norm and ``lm_head`` (last stage). Tensors keep the model's dtype.
    Weight sync calls this per stage; ``megatron_to_hf_state_dict`` assembles all stages.
    """
    s = _shapes(hf_config)
    model = getattr(model, "module", model)
    layer_of = _local_layers(model)
    for mname, t in model.state_dict(keep_vars=True).items():
        if mname.endswith("_extra_state") or t is None:
            continue
        yield from _hf_tensors(_strip_prefix(mname), t, layer_of, s, copy)


def _hf_shapes(mname: str, t: torch.Tensor, layer_of: dict[int, int], s: _Shapes) -> list[tuple[str, list[int]]]:
    """The HF names and full shapes :func:`_hf_tensors` yields for ``mname``, from the local
    shard's shape alone (no gather)."""
    shape = list(t.shape)
    if mname in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [("model.embed_tokens.weight" if mname.startswith("embedding") else "lm_head.weight",
                 [s.vocab, *shape[1:]])]
    if mname == "decoder.final_layernorm.weight":
        return [("model.norm.weight", shape)]
    parts = mname.split(".")
    local, rest = int(parts[2]), ".".join(parts[3:])
    p = f"model.layers.{layer_of[local]}."
    if rest == "input_layernorm.weight":
        return [(p + "input_layernorm.weight", shape)]
    if rest == "pre_mlp_layernorm.weight":
        return [(p + "post_attention_layernorm.weight", shape)]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind, tail = rest.rsplit(".", 1)[1], shape[1:]
        return [(f"{p}self_attn.q_proj.{kind}", [s.heads * s.head_dim, *tail]),
                (f"{p}self_attn.k_proj.{kind}", [s.groups * s.head_dim, *tail]),
                (f"{p}self_attn.v_proj.{kind}", [s.groups * s.head_dim, *tail])]
    if rest in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        name = "self_attn.o_proj.weight" if rest.startswith("self") else "mlp.down_proj.weight"
        return [(p + name, [shape[0], shape[1] * s.tp])]
    if rest == "mlp.linear_fc1.weight":
        half = [shape[0] // 2 * s.tp, *shape[1:]]
        return [(p + "mlp.gate_proj.weight", half), (p + "mlp.up_proj.weight", list(half))]
    raise KeyError(f"no HF mapping for Megatron tensor {mname!r}")


def hf_weight_index(model, hf_config) -> list[list]:
    """``[hf_name, shape, dtype]`` of every tensor :func:`iter_hf_weights` yields for this
    pipeline stage, in the same order, without gathering anything: the weight sync's up-front
    index (``send_weights(..., index=...)``), so receivers check and size the whole update before
    the first bucket."""
    s = _shapes(hf_config)
    model = getattr(model, "module", model)
    layer_of = _local_layers(model)
    out = []
    for mname, t in model.state_dict(keep_vars=True).items():
        if mname.endswith("_extra_state") or t is None:
            continue
        out.extend([name, shape, str(t.dtype)] for name, shape in _hf_shapes(_strip_prefix(mname), t, layer_of, s))
    return out


def megatron_to_hf_state_dict(model, hf_config) -> dict[str, torch.Tensor]:
    """The full HF ``LlamaForCausalLM`` state dict, assembled from all TP ranks and PP stages.

    A collective over the tensor- and pipeline-parallel groups: every rank must call it, and
    every rank gets the whole dict (on CPU tensors, in the model's dtype). For export and tests;
    a full 405B does not fit one process: stream stages with ``iter_hf_weights`` instead.
    """
    from megatron.core import parallel_state as ps

    local = dict(iter_hf_weights(model, hf_config))
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return {k: v.cpu() for k, v in local.items()}
    device = next(getattr(model, "module", model).parameters()).device
    group = ps.get_pipeline_model_parallel_group()
    my_stage = ps.get_pipeline_model_parallel_rank()
    result: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        src = dist.get_global_rank(group, stage)
        meta = [[(k, tuple(v.shape), v.dtype) for k, v in local.items()] if stage == my_stage
                else None]
        dist.broadcast_object_list(meta, src=src, group=group)
        for name, shape, dtype in meta[0]:
            if stage == my_stage:
                t = local[name].contiguous()
            else:
                t = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, src=src, group=group)
            result[name] = t.cpu()
    return result
