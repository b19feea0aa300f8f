"""`tulu export CKPT OUT`: a verified training checkpoint as a Hugging Face model folder
(config, safetensors, tokenizer) that transformers and vLLM load.

The checkpoint's model is resharded to TP1/PP1 in this one process (Megatron
`dist_checkpointing` loads any layout) and mapped to HF names by `tulu.models.convert`. The
architecture and tokenizer come from the checkpoint itself (recorded by the trainer), so a
checkpoint exports without its run's config.

OUT is written whole or not at all: the folder is built next to it and renamed into place. A
non-empty OUT is refused unless `--force` (then it is replaced, never mixed with the new files),
and OUT may not be, hold or lie inside the checkpoint. The paths are checked before torch and
Megatron are imported.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from tulu.deletion import refusal, remove_tree
from tulu.errors import CommandError


def check_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint folder, if it looks like one (cheap: no import, no checksum)."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CommandError("checkpoint not found", path)
    if not path.is_dir():
        raise CommandError("checkpoint is not a folder", path,
                           "give a step_N folder or a run's checkpoints/ folder")
    try:
        committed = (path / "manifest.json").exists() or any(
            (d / "manifest.json").exists() for d in path.glob("step_*"))
    except PermissionError:
        raise CommandError("cannot read checkpoint (permission denied)", path) from None
    if not committed:
        raise CommandError("no committed checkpoint", path,
                           "expected a step_N folder with manifest.json, or a folder of them")
    return path


def check_output(out: str | Path, checkpoint: Path, force: bool) -> Path:
    """Refuse an OUT that would mix with other files or overwrite the checkpoint."""
    given = out
    out = Path(os.path.abspath(Path(out).expanduser()))
    target, source = out.resolve(), checkpoint.resolve()
    if target == source or target.is_relative_to(source) or source.is_relative_to(target):
        raise CommandError("the output folder would overwrite the checkpoint", given,
                           "export to a folder outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CommandError("the output exists and is not a folder", given)
        reason = refusal(out)
        if reason:
            raise CommandError("refusing to replace the output folder", given, reason)
        if any(out.iterdir()) and not force:
            raise CommandError("the output folder is not empty", given,
                               "choose another folder, or pass --force to replace it")
    parent = out.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError("cannot write the output folder (permission denied)", existing)
    return out


def _write_hf(path: Path, out: Path, dtype: str) -> None:
    """The verified checkpoint at `path` (a step_N folder) as a HF folder `out`."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import LlamaConfig, LlamaForCausalLM

    from tulu.checkpoint import sharded
    from tulu.models import megatron_cpu
    from tulu.models.convert import megatron_to_hf_state_dict
    from tulu.models.llama import build_gpt_model
    from tulu.train.data import build_tokenizer
    from tulu.checkpoint.stage import StageCheckpoint

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


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", *, force: bool = False) -> Path:
    """Write the checkpoint's model to `out` as a HF folder; returns `out`. With `force` an
    existing `out` is replaced (after `tulu.deletion`'s checks); the new folder appears whole."""
    checkpoint = check_checkpoint(checkpoint)
    out = check_output(out, checkpoint, force)

    from tulu.checkpoint.manager import resolve_checkpoint

    try:
        path, _ = resolve_checkpoint(checkpoint)  # refuses a checkpoint that does not verify
    except RuntimeError as e:
        raise CommandError("the checkpoint does not verify", checkpoint, str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}.tmp")
    remove_tree(tmp)
    try:
        _write_hf(path, tmp, dtype)
        if out.exists() and any(out.iterdir()):
            aside = out.with_name(f".{out.name}.replaced-{os.getpid()}.tmp")
            os.rename(out, aside)
            os.rename(tmp, out)
            remove_tree(aside)
        else:
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
    finally:
        remove_tree(tmp)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a step_N folder, or a run's checkpoints/ folder (newest verified)")
    p.add_argument("out", help="output folder (new or empty; see --force)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.out, args.dtype, force=args.force)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tulu.export ...` is `tulu export ...`."""
    from tulu.cli import main as cli_main

    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
