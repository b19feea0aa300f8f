"""``tulu export CKPT OUT``: a verified checkpoint's model as a Hugging Face folder.

The Megatron -> HF name mapping is not known here: the caller passes ``convert``, a function
from the checkpoint's full (unsharded) tensors to ``(hf_state_dict, hf_config_dict_or_None)``
(the models package provides it). This module finds and verifies the checkpoint, gathers full
tensors whatever TP/PP wrote them, and writes ``model*.safetensors`` (+ index) and
``config.json``. It runs in one process, without torch.distributed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import collectives
from .manager import CheckpointManager
from .manifest import Manifest

__all__ = ["ConvertFn", "export_hf", "main", "resolve_checkpoint"]

log = logging.getLogger("tulu.checkpoint")

ConvertFn = Callable[[Mapping[str, torch.Tensor], Manifest],
                     "tuple[Mapping[str, torch.Tensor], Mapping[str, Any] | None]"]


def resolve_checkpoint(path: str | Path) -> tuple[Path, Manifest]:
    """``path`` is a ``step_N`` folder (must verify) or a run's checkpoint root (newest that
    verifies)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        mgr = CheckpointManager(path.parent)
        problems = mgr.verify(path)
        if problems:
            raise RuntimeError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
    else:
        mgr = CheckpointManager(path)
        found = mgr.latest_verified()
        if found is None:
            raise FileNotFoundError(f"no verified checkpoint under {path}")
        path = found[1]
    from .manifest import read_manifest
    return path, read_manifest(path)


def export_hf(checkpoint: str | Path, out: str | Path, convert: ConvertFn, *,
              max_shard_bytes: int = 5 << 30) -> Path:
    """Write the model of ``checkpoint`` to ``out`` in HF format; returns ``out``."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    path, manifest = resolve_checkpoint(checkpoint)
    with collectives.single_process_group():
        full = dist_checkpointing.load_plain_tensors(str(path / "model"))
    hf_sd, hf_config = convert(full, manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(hf_sd):
        t = hf_sd[name].detach().contiguous().clone()  # safetensors refuses shared storage
        if shards[-1] and size + t.numel() * t.element_size() > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    meta = {"format": "pt", "tulu_step": str(manifest.step), "tulu_config_hash":
            manifest.config_hash}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if hf_config is not None:
        (out / "config.json").write_text(json.dumps(dict(hf_config), indent=1))
    log.info("exported step %d of %s to %s (%d tensors)", manifest.step, path, out, len(hf_sd))
    return out


def _import_convert(spec: str) -> ConvertFn:
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--convert wants 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def main(argv: Sequence[str] | None = None, *, convert: ConvertFn | None = None) -> int:
    """``tulu export CKPT OUT [--convert pkg.mod:fn]``; the CLI passes its default ``convert``."""
    p = argparse.ArgumentParser(prog="tulu export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a step_N folder or a run's checkpoint root")
    p.add_argument("out", help="output folder for the HF model")
    p.add_argument("--convert", help="Megatron->HF mapping as package.module:function")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    args = p.parse_args(argv)
    fn = _import_convert(args.convert) if args.convert else convert
    if fn is None:
        p.error("no conversion function: pass --convert package.module:function")
    export_hf(args.checkpoint, args.out, fn, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    return 0
