"""`tulu export CKPT OUT`: a verified training checkpoint as a Hugging Face model folder
(config, safetensors, tokenizer) that transformers and vLLM load.

The checkpoint's model is resharded to TP1/PP1 in this one process (Megatron
`dist_checkpointing` loads any layout) and mapped to HF names by `tulu.models.convert`. The
architecture and tokenizer come from the checkpoint itself (recorded by the trainer), so a
checkpoint exports without its run's config.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import LlamaConfig, LlamaForCausalLM

    from tulu.checkpoint import sharded
    from tulu.checkpoint.export import resolve_checkpoint
    from tulu.models import megatron_cpu
    from tulu.models.convert import megatron_to_hf_state_dict
    from tulu.models.llama import build_gpt_model
    from tulu.train.data import build_tokenizer
    from tulu.train.model import StageCheckpoint

    path, _ = resolve_checkpoint(checkpoint)  # refuses a checkpoint that does not verify
    recorded = StageCheckpoint(path).model_source()
    hf_config = LlamaConfig(**recorded["hf_config"])
    owns_world = not dist.is_initialized()
    if owns_world:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=30))
    try:
        megatron_cpu.apply()
        ps.initialize_model_parallel(1, 1)
        model = build_gpt_model(hf_config, dtype=torch.float32)
        sharded.load_model(model, path / "model")
        state = megatron_to_hf_state_dict(model, hf_config)
        ps.destroy_model_parallel()
    finally:
        if owns_world:
            dist.destroy_process_group()
    out = Path(out)
    hf = LlamaForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"export of {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype == "bf16":
        hf = hf.to(torch.bfloat16)
    tokenizer = build_tokenizer(recorded["tokenizer"])
    # The special ids come from the tokenizer, not LlamaConfig's defaults (eos 2 is `<|system|>` in
    # the tiny tokenizer): generate() and vLLM stop on the model config's eos.
    for cfg in (hf.config, hf.generation_config):
        cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = (
            tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
    hf.save_pretrained(out)
    if recorded["tokenizer"] == "tiny":
        from tulu.data import save_tiny_tokenizer

        save_tiny_tokenizer(out)
    else:
        tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tulu export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a step_N folder, or a run's checkpoints/ folder (newest verified)")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args(argv)
    out = export(a.checkpoint, a.out, a.dtype)
    print(f"exported {a.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
