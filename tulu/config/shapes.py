"""Shapes of the models we plan for, and their parameter counts. Pure arithmetic, no torch.

Shapes are the published Llama 3.1 configs (`config.json` of meta-llama/Llama-3.1-*), so the
planner needs no download. Parameter counts are checked in tests against the published totals
(8.03B, 70.6B, 405.9B).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params_per_layer(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        norms = 2 * h
        return attention + mlp + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        output = 0 if self.tied_embeddings else self.embedding_params
        return self.num_layers * self.params_per_layer + self.embedding_params + output + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _from_presets() -> dict[str, ModelShape]:
    # One source of truth for the shapes: tulu.models.presets (plain data, no torch import).
    from tulu.models.presets import LLAMA_PRESETS

    out = {}
    for preset, cfg in LLAMA_PRESETS.items():
        name = preset.replace("llama", "llama-", 1)  # llama3.1-8b -> llama-3.1-8b
        out[name] = shape_from_hf_config(name, cfg)
    return out


# HF names we know the shape of without reading config.json.
HF_NAME_TO_ARCH = {
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "meta-llama/Llama-3.1-405B": "llama-3.1-405b",
    "allenai/Llama-3.1-Tulu-3-8B-SFT": "llama-3.1-8b",
    "allenai/Llama-3.1-Tulu-3-8B-DPO": "llama-3.1-8b",
    "allenai/Llama-3.1-Tulu-3-8B": "llama-3.1-8b",
    "allenai/Llama-3.1-Tulu-3-405B-SFT": "llama-3.1-405b",
    "allenai/Llama-3.1-Tulu-3-405B-DPO": "llama-3.1-405b",
}


def shape_from_hf_config(name: str, cfg: dict) -> ModelShape:
    return ModelShape(
        name=name,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


ARCHITECTURES: dict[str, ModelShape] = _from_presets()


def resolve_shape(model_cfg, hub_cache: str | None = None) -> ModelShape:
    """The shape of a `ModelConfig`: named arch, tiny arch, a local or cached config.json (in the
    Hugging Face cache the job will read: ``hub_cache``, else the default), or a known HF name."""
    import json
    from pathlib import Path

    if model_cfg.arch:
        return ARCHITECTURES[model_cfg.arch]
    if model_cfg.tiny is not None:
        t = model_cfg.tiny
        return ModelShape("tiny", t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                          t.num_attention_heads, t.num_key_value_heads)
    name = model_cfg.name_or_path
    cfg_file = Path(name) / "config.json"
    if not cfg_file.is_file():
        cfg_file = _cached_hub_config(name, hub_cache)
    if cfg_file is not None and cfg_file.is_file():  # the folder the job will read beats the table
        return shape_from_hf_config(name, json.loads(cfg_file.read_text()))
    if name in HF_NAME_TO_ARCH:
        return ARCHITECTURES[HF_NAME_TO_ARCH[name]]
    from tulu.checkpoint.stage import StageCheckpoint  # an earlier stage's tulu checkpoint records its shape

    stage = StageCheckpoint.find(name)
    if stage is not None:
        return shape_from_hf_config(name, stage.model_source()["hf_config"])
    raise ValueError(
        f"model.name_or_path: cannot tell the shape of {name!r} without downloading it; "
        f"give a local folder with config.json, or set model.arch to one of {', '.join(ARCHITECTURES)}"
    )


def _cached_hub_config(name: str, hub_cache: str | None = None):
    """``config.json`` of hub model ``name`` if the local Hugging Face cache holds it (no network)."""
    from pathlib import Path

    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "config.json", cache_dir=hub_cache)
    return Path(found) if isinstance(found, str) else None
