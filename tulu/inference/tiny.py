"""A tiny random Llama checkpoint folder for tests and benchmarks (nothing is downloaded).

    save_tiny_llama(tmp_path / "model")   # config.json, model.safetensors, tokenizer files

The shapes suit vLLM on CPU (head_dim 32; vLLM's CPU attention takes 32/64/80/96/112/128) and
the project's byte-level tokenizer (vocab 261, eos 1, pad 0).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_tiny_llama"]


def save_tiny_llama(out_dir: str | Path, *, hidden_size: int = 128, intermediate_size: int = 256,
                    num_hidden_layers: int = 2, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, max_position_embeddings: int = 512,
                    seed: int = 0, init_std: float = 0.1) -> Path:
    """Write a random ``LlamaForCausalLM`` (fp32, untied) and the tiny tokenizer to ``out_dir``.

    ``init_std`` is larger than transformers' default 0.02 so that greedy decoding is decisive
    (no near-ties between the top two logits that float rounding could flip between engines).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from tulu.data.tokenizer import TINY_VOCAB_SIZE, save_tiny_tokenizer

    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=init_std, dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    save_tiny_tokenizer(out)
    return out
